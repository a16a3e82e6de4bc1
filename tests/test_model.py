"""The model: parameter counts, attention paths against references, MoE dispatch, YaRN, KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, sharp_model, tiny_config

import minimind.model as model_module
from minimind.config import ModelConfig, preset
from minimind.errors import ConfigError
from minimind.generate import SamplingParams, generate
from minimind.model import KVCache, MiniMind, MoE, rope_frequencies

# Upstream MiniMind's published sizes (MiniMind2: 25.83M / 104.03M / 145.03M, minimind-3: 63.91M / 198.42M).
EXPECTED_PARAMS = {
    "minimind2-small": 25_829_888,
    "minimind2": 104_030_976,
    "minimind2-moe": 145_029_760,
    "minimind3": 63_912_192,
    "minimind3-moe": 198_416_640,
}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_preset_parameter_counts_match_upstream(name):
    with torch.device("meta"):
        model = MiniMind(preset(name))
    assert model.num_params() == EXPECTED_PARAMS[name]
    assert round(model.num_params() / 1e6, 2) == round(EXPECTED_PARAMS[name] / 1e6, 2)


def test_tiny_presets_are_small():
    for name in ("tiny", "tiny-moe"):
        with torch.device("meta"):
            n = MiniMind(preset(name)).num_params()
        assert 1e6 <= n <= 5e6, (name, n)


def test_lm_head_is_tied_to_embedding():
    model = MiniMind(tiny_config())
    assert model.lm_head.weight is model.embed_tokens.weight


def reference_sdpa(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, enable_gqa=False):
    """Attention written out: softmax(q k^T / sqrt(d) + mask) v, with kv heads repeated for GQA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    Tq, Tk = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = torch.ones(Tq, Tk, dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("name", ["gqa", "qk_norm", "moe"])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_plain_attention(name, padded, monkeypatch):
    model = sharp_model(name)
    ids = torch.randint(3, 512, (2, 12))
    mask = None
    if padded:
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :5] = 0
    fast = model(ids, attention_mask=mask).logits
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", reference_sdpa)
    slow = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padding_equals_unpadded(name):
    """A left-padded row gives the same logits at its real positions as the sequence alone."""
    model = sharp_model(name)
    short, long = torch.randint(3, 512, (1, 7)), torch.randint(3, 512, (1, 12))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = (torch.arange(12) >= torch.tensor([[5], [0]])).long()
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 5:], model(short).logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], model(long).logits[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()  # pad queries see themselves, never NaN


def naive_greedy(model, prompt, n):
    """Reference decoding: recompute the whole sequence at every step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_greedy_equals_recompute(name):
    model = sharp_model(name)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (9, 4, 13)]
    out = generate(model, prompts, SamplingParams(max_new_tokens=24, temperature=0))
    with torch.no_grad():
        for prompt, gen in zip(prompts, out.generations):
            assert gen.tokens == naive_greedy(model, prompt, 24)


@pytest.mark.parametrize("name", ["gqa", "yarn", "moe"])
def test_cache_with_multi_token_chunks(name):
    """Prefill 6, then a chunk of 5, then 1 token: logits equal a single full forward pass."""
    model = sharp_model(name)
    ids = torch.randint(3, 512, (2, 12))
    full = model(ids).logits
    cache = KVCache(model.cfg, 2, 16)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 6), (6, 11), (11, 12))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == 12


def test_cache_chunk_with_left_padding():
    model = sharp_model("qk_norm")
    ids = torch.randint(3, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask).logits
    cache = KVCache(model.cfg, 2, 10)
    first = model(ids[:, :7], attention_mask=mask[:, :7], cache=cache).logits
    second = model(ids[:, 7:], attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(torch.cat([first, second], 1)[mask.bool()], full[mask.bool()], atol=1e-4, rtol=1e-4)


def test_cache_overflow_is_a_clear_error():
    model = MiniMind(tiny_config()).eval()
    cache = KVCache(model.cfg, 1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.randint(3, 512, (1, 5)), cache=cache)


def test_segment_ids_keep_documents_apart():
    """Two documents packed in one row behave exactly like two separate rows."""
    model = sharp_model("qk_norm")
    a, b = torch.randint(3, 512, (1, 5)), torch.randint(3, 512, (1, 7))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    out = model(packed, segment_ids=seg).logits
    torch.testing.assert_close(out[:, :5], model(a).logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:, 5:], model(b).logits, atol=1e-4, rtol=1e-4)
    # Without segment ids the second document sees the first: different logits.
    assert not torch.allclose(model(packed).logits[:, 5:], model(b).logits, atol=1e-3)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference: sum of w_e * expert_e(x) over the chosen experts, plus shared experts."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, experts = moe.route(flat)
    rows = []
    for t in range(flat.shape[0]):
        y = sum(w * moe.experts[int(e)](flat[t]) for w, e in zip(weights[t], experts[t]))
        rows.append(y + sum(s(flat[t]) for s in moe.shared_experts))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("name", ["moe", "moe_top1"])
def test_moe_dispatch_equals_per_token_loop(name):
    moe = MoE(tiny_config(name))
    x = torch.randn(3, 7, 64)
    y, aux = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-4, rtol=1e-4)
    assert aux.item() >= 1.0 - 1e-5  # E * sum f_e P_e is at least 1 (equality when perfectly balanced)


@pytest.mark.parametrize("name", ["moe", "moe_top1"])
def test_router_learns_from_lm_loss(name):
    """The routing weight carries the softmax probability, so the LM loss alone trains the router."""
    model = MiniMind(tiny_config(name, aux_loss_coef=0.0))
    ids = torch.randint(3, 512, (2, 16))
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    for layer in model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0


def test_top1_with_renormalisation_is_refused():
    with pytest.raises(ConfigError, match="starves the router"):
        ModelConfig(**CONFIGS["moe_top1"] | {"norm_topk_prob": True})


def test_aux_loss_pushes_towards_balance():
    model = MiniMind(tiny_config("moe", aux_loss_coef=1.0))
    ids = torch.randint(3, 512, (4, 32))
    out = model(ids)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_yarn_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config("yarn", rope_factor=4.0, rope_original_max_position_embeddings=64, max_position_embeddings=256)
    ours, attention_factor = rope_frequencies(cfg)
    hf_cfg = LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    torch.testing.assert_close(ours, theirs.float(), atol=0, rtol=1e-6)
    assert attention_factor == pytest.approx(their_factor)
    plain, _ = rope_frequencies(tiny_config())
    assert ours[0] == plain[0]  # fastest dimension untouched
    assert ours[-1] == pytest.approx(plain[-1] / 4)  # slowest dimension interpolated by the factor


def test_flops_and_mfu():
    model = MiniMind(tiny_config())
    c = model.cfg
    expected = 6 * model.num_params() + 12 * c.num_layers * c.num_heads * c.head_dim * 128
    assert model.flops_per_token(128) == expected
    assert model.estimate_mfu(1000.0, 128, peak_flops=expected * 2000) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["moe", "moe_top1"])
@pytest.mark.parametrize("tokens", [1, 21])
def test_moe_grouped_matmuls_equal_split(name, tokens):
    """The GPU dispatch (grouped matmuls, group sizes kept on the device) gives the split dispatch's
    values and gradients w.r.t. the input and every parameter, experts left without tokens included."""
    moe = MoE(tiny_config(name))
    x = torch.randn(1, tokens, 64, requires_grad=True)
    g = torch.randn(1, tokens, 64)
    results = []
    for grouped in (False, True):
        moe.grouped_mm = grouped
        y, aux = moe(x)
        results.append((y, aux, torch.autograd.grad((y * g).sum() + aux, [x, *moe.parameters()])))
    (y0, aux0, grads0), (y1, aux1, grads1) = results
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux1, aux0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    moe.grouped_mm = None
    assert not moe.use_grouped(x)  # on CPU the split path stays
