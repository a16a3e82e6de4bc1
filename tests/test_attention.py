"""The fused attention paths (minimind.attention) against the spec (dense-mask SDPA), on CPU.

On CUDA, packed rows take FlexAttention and padding takes expanded k/v; here both are forced and
must give the dense path's values and gradients, for the kernel alone and for the whole model.
FlexAttention refuses gradients on CPU (its compiled CPU backward is missing); its eager backward,
the same math the CUDA kernel is checked against upstream, is reached by lifting that device check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_model

import minimind.attention as attention
from minimind.model import KVCache, MiniMind, attention_rule

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FUSED = ["flex", "expanded"]
SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])


@pytest.fixture(autouse=True)
def _flex_backward_on_cpu(monkeypatch):
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


def left_padding(rows: int, width: int, pads: tuple[int, ...]) -> torch.Tensor:
    return (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()


def qkv(batch, heads, kv_heads, seq_len, kv_len, head_dim=16):
    q = torch.randn(batch, heads, seq_len, head_dim, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, requires_grad=True)
    return q, k, v


def spec(q, k, v, rule, past):
    mask = attention.dense_mask(rule, q.shape[0], q.shape[2], past + q.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def assert_same_values_and_grads(out, ref, inputs):
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize(
    "case", ["packed", "padded", "padded_cache", "packed_padded"], ids=lambda c: c.replace("_", "+")
)
def test_fused_kernels_equal_the_dense_mask(backend, kv_heads, case):
    """Values and gradients w.r.t. q, k, v for packed rows (three and two documents), left padding,
    left padding behind a KV cache (6 cached positions, 5 new queries), and both at once."""
    past = 6 if case == "padded_cache" else 0
    T = 5 if case == "padded_cache" else 12
    pad = left_padding(2, past + T, (4, 0)) if "padded" in case else None
    seg = SEGMENTS if "packed" in case else None
    rule = attention_rule(T, past, pad, seg)
    q, k, v = qkv(2, 4, kv_heads, T, past + T)
    with attention.forced(backend):
        mask = attention.prepare(rule, 2, T, past, q.device, packed=seg is not None, dropout=False)
    assert mask.backend == backend
    assert_same_values_and_grads(attention.attend(mask, q, k, v, 0.0), spec(q, k, v, rule, past), (q, k, v))


def test_choice_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.choose(cpu, 12, packed=True, dropout=False) == "dense"  # the spec is the CPU path
    assert attention.choose(cuda, 12, packed=True, dropout=False) == "flex"
    assert attention.choose(cuda, 12, packed=True, dropout=True) == "expanded"  # FlexAttention has no dropout
    assert attention.choose(cuda, 12, packed=False, dropout=False) == "expanded"
    assert attention.choose(cuda, 1, packed=False, dropout=False) == "dense"  # one query per row: B x H x L
    with attention.forced("flex"):
        assert attention.choose(cpu, 12, packed=False, dropout=False) == "flex"
        assert attention.choose(cpu, 1, packed=False, dropout=False) == "dense"
    with pytest.raises(ValueError, match="unknown attention backend"), attention.forced("flash"):
        pass


def forward_backward(model: MiniMind, ids, **kwargs):
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["dense", "qk_norm", "moe"])
@pytest.mark.parametrize("inputs", ["segment_ids", "attention_mask"])
def test_model_forward_backward_equals_dense(backend, name, inputs):
    """MiniMind's logits and every parameter's gradient, packed rows or left padding, in training mode."""
    model = sharp_model(name).train()
    ids = torch.randint(3, 512, (2, 12))
    kwargs = {"segment_ids": SEGMENTS} if inputs == "segment_ids" else {"attention_mask": left_padding(2, 12, (5, 0))}
    ref_logits, ref_grads = forward_backward(model, ids, **kwargs)
    with attention.forced(backend):
        logits, grads = forward_backward(model, ids, **kwargs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("backend", FUSED)
def test_padded_prefill_and_chunk_with_cache_equal_dense(backend):
    """Left-padded prefill into a KV cache, a multi-token chunk behind it, then one decode step."""
    model = sharp_model("gqa")
    ids = torch.randint(3, 512, (2, 12))
    mask = left_padding(2, 12, (4, 0))

    def run():
        cache = KVCache(model.cfg, 2, 12)
        with torch.no_grad():
            return torch.cat(
                [
                    model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache).logits
                    for a, b in ((0, 7), (7, 11), (11, 12))
                ],
                1,
            )

    ref = run()
    with attention.forced(backend):
        out = run()
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_dropout_is_refused_by_flex():
    rule = attention_rule(12, 0, None, SEGMENTS)
    q, k, v = qkv(2, 4, 2, 12, 12)
    with attention.forced("flex"):
        mask = attention.prepare(rule, 2, 12, 0, q.device, packed=True, dropout=True)
    with pytest.raises(ValueError, match="no dropout"):
        attention.attend(mask, q, k, v, 0.1)
