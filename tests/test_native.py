"""The native decode kernels (minimind/csrc/decode.c) against torch: values, determinism, when they are
used, and the fallback when they cannot be built."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_model, tiny_config

from minimind import native
from minimind.fastdecode import FastDecoder, step_weights
from minimind.generate import SamplingParams, generate
from minimind.lora import LoRAConfig, inject
from minimind.model import KVCache, MiniMind, RotaryEmbedding, apply_rope

needs_kernel = pytest.mark.skipif(
    not native.supported() or shutil.which("cc") is None, reason="needs Linux x86-64 with AVX2 and a C compiler"
)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A kernel state of its own, built into a temporary cache."""
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", "unloaded")
    monkeypatch.setattr(native, "_kernel", None)
    return tmp_path


@needs_kernel
@pytest.mark.parametrize(
    "rows,k,n",
    [(16, 512, 1408), (16, 1408, 512), (16, 64, 6400), (1, 96, 30), (5, 37, 11), (17, 100, 7), (32, 8, 3), (4, 3, 2)],
)
def test_kernel_equals_a_float64_reference(rows, k, n):
    """Every tile shape and tail: rows not a multiple of 4, weights not of 3, K not of 8; with a bias."""
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w, b = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    with torch.no_grad():
        y = native.decode_linear(x, w, b)
    assert y is not None and y.shape == (rows, n) and y.dtype == torch.float32
    ref = x.double() @ w.double().T + b.double()
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5 * (k**0.5) * 4, err  # fp32 rounding over K terms
    assert err <= 2 * (F.linear(x, w, b).double() - ref).abs().max().item() + 1e-6  # as close as BLAS is


def cache_with_history(batch, kv_heads, d, past, gen, layers=2):
    """A KV cache whose layer 1 holds `past` random positions (room for 7 more)."""
    cfg = SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=d)
    cache = KVCache(cfg, batch, past + 8)
    cache.k[1, :, :, :past] = torch.randn(batch, kv_heads, past, d, generator=gen)
    cache.v[1, :, :, :past] = torch.randn(batch, kv_heads, past, d, generator=gen)
    cache.length = past
    return cache


def torch_step(q, k, v, cos, sin, cache, mask):
    """The model's own path for one decode step of layer 1: RoPE, KVCache.update, SDPA."""
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    k, v = cache.update(1, k, v.transpose(1, 2))
    heads, kv_heads = q.shape[1], k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)[:, :, 0]


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d,past", [(8, 2, 64, 160), (4, 4, 16, 0), (6, 3, 12, 39)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_kernel_equals_rope_cache_update_and_sdpa(heads, kv_heads, d, past, padded):
    """One new token per row, grouped-query, at left-padded positions: the output and the cache rows it
    writes equal the model's torch path (apply_rope, KVCache.update, F.scaled_dot_product_attention)."""
    gen = torch.Generator().manual_seed(past + d)
    B = 5
    q = torch.randn(B, 1, heads, d, generator=gen)
    k, v = torch.randn(B, 1, kv_heads, d, generator=gen), torch.randn(B, 1, kv_heads, d, generator=gen)
    keep = torch.ones(B, past + 1, dtype=torch.bool)
    if padded:
        for b in range(B):
            keep[b, : min(b * 3, past)] = False  # row b has b * 3 pads on the left
    rotary = RotaryEmbedding(SimpleNamespace(head_dim=d, rope_theta=1e6, rope_scaling="", max_position_embeddings=512))
    if padded:
        cos, sin = rotary(keep.long().sum(-1, keepdim=True) - 1)  # the new token's position in each row
    else:
        cos, sin = rotary(torch.tensor([[past]]))  # no padding: one position shared by all rows (batch 1)
    mask = keep[:, None, None, :] if padded else None
    ours, ref = cache_with_history(B, kv_heads, d, past, gen), cache_with_history(B, kv_heads, d, past, gen)
    ours.k.copy_(ref.k), ours.v.copy_(ref.v)
    with torch.no_grad():
        y = native.decode_attention(q, k, v, cos, sin, ours, 1, mask)
        expected = torch_step(q, k, v, cos, sin, ref, mask)
    assert y is not None
    torch.testing.assert_close(y, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours.k, ref.k, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours.v, ref.v) and ours.length == past  # the model advances the length itself


@needs_kernel
def test_attention_kernel_is_used_only_where_it_applies():
    gen = torch.Generator().manual_seed(0)
    cache = cache_with_history(2, 2, 8, 4, gen)
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    cos, sin = torch.ones(2, 1, 1, 8), torch.zeros(2, 1, 1, 8)
    with torch.no_grad():
        assert native.decode_attention(q, k, v, cos, sin, cache, 1, None) is not None
        two = native.decode_attention(q.expand(2, 2, 4, 8), k.expand(2, 2, 2, 8), v, cos, sin, cache, 1, None)
        assert two is None  # two new tokens: prefill
        assert native.decode_attention(q, k, v, cos, sin, cache, 1, torch.zeros(2, 1, 1, 5)) is None  # float mask
        assert native.decode_attention(q.double(), k.double(), v.double(), cos, sin, cache, 1, None) is None
        cache.length = cache.max_len  # no room left
        assert native.decode_attention(q, k, v, cos, sin, cache, 1, None) is None
    cache.length = 4
    assert native.decode_attention(q, k, v, cos, sin, cache, 1, None) is None  # autograd on


@needs_kernel
@pytest.mark.parametrize("shape", [(16, 1, 512), (3, 2, 4, 12), (1, 7)])
def test_rmsnorm_kernel_equals_the_model_norm(shape):
    from minimind.model import RMSNorm

    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        x = torch.randn(shape) * 3
        y = native.decode_rmsnorm(x, norm.weight, 1e-5)
    ref = norm(x)  # autograd on: torch's path
    assert y is not None and y.shape == x.shape
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)


@needs_kernel
def test_softmax_exp_is_accurate_down_to_masked_keys():
    """The attention kernel's vectorised exp: scores spread from 0 to -100 (and -inf, masked) give the
    softmax weights torch computes, the tiny ones included."""
    L = 203  # keys, and the head size: values are one-hot, so output d is the weight of key d
    cache = cache_with_history(1, 1, L, L - 1, torch.Generator().manual_seed(0))
    scores = -torch.linspace(0, 100, L) * L**0.5  # key l scores -100 l / (L - 1)
    cache.k[1, 0, 0, : L - 1] = 0
    cache.k[1, 0, 0, : L - 1, 0] = scores[:-1]
    cache.v[1, 0, 0, : L - 1] = torch.eye(L)[: L - 1]
    q = torch.zeros(1, 1, 1, L)
    q[..., 0] = 1
    k_new = torch.zeros(1, 1, 1, L)
    k_new[..., 0] = scores[-1]
    v_new = torch.eye(L)[L - 1].reshape(1, 1, 1, L)
    cos, sin = torch.ones(1, 1, 1, L), torch.zeros(1, 1, 1, L)  # RoPE at position 0: the identity
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
    mask[..., 3] = False
    ref_cache = cache_with_history(1, 1, L, L - 1, torch.Generator().manual_seed(0))
    ref_cache.k.copy_(cache.k), ref_cache.v.copy_(cache.v)
    with torch.no_grad():
        y = native.decode_attention(q, k_new, v_new, cos, sin, cache, 1, mask)
        ref = torch_step(q, k_new, v_new, cos, sin, ref_cache, mask)
    assert y is not None and y[0, 0, 3] == 0
    torch.testing.assert_close(y, ref, atol=1e-7, rtol=1e-5)


@needs_kernel
def test_sampling_kernel_refuses_nan_logits():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN"):
        native.sample_rows(logits, torch.rand(3, dtype=torch.float64))


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count():
    x, w = torch.randn(16, 512), torch.randn(1400, 512)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with torch.no_grad():
                outs.append(native.decode_linear(x, w))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_kernel_is_used_only_for_few_rows_without_gradients():
    w = torch.randn(64, 32)
    with torch.no_grad():
        assert native.decode_linear(torch.randn(2, 16, 32), w) is not None  # 32 rows: decoding
        assert native.decode_linear(torch.randn(2, 17, 32), w) is None  # 34 rows: BLAS
        assert native.decode_linear(torch.randn(4, 32, dtype=torch.float64), w.double()) is None
        assert native.decode_linear(torch.randn(4, 64)[:, ::2], w) is not None  # strided input is copied
    assert native.decode_linear(torch.randn(4, 32), w) is None  # autograd on: torch (training is untouched)
    assert native.decode_linear(torch.randn(4, 32), w.T.contiguous().T) is None  # non-contiguous weight


def lora_model() -> MiniMind:
    """sharp_model with LoRA on q/v (non-zero B, so the adapters change the output)."""
    model = sharp_model("gqa")
    inject(model, LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.25)
    return model.eval()


@needs_kernel
@pytest.mark.parametrize(
    "kind,padded,fused",
    [("gqa", True, True), ("gqa", False, True), ("qk_norm", True, True), ("yarn", True, True),
     ("moe", True, False), ("lora", True, False)],
)  # fmt: skip
def test_decoding_with_the_kernels_matches_torch(monkeypatch, kind, padded, fused):
    """The model's decode steps go through the kernels (counted) and give torch's log-probs and tokens,
    with left-padded rows and without padding (one position shared by every row). Dense models take the
    fused step (one call per token); MoE and LoRA-wrapped projections take the module-by-module kernels."""
    model = lora_model() if kind == "lora" else sharp_model(kind)
    prompts = [[5, 17, 42, 9], [7, 7, 100], [300, 12, 13, 14, 15, 16]] if padded else [[5, 17, 42, 9]] * 3
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=1.0, seed=4)
    calls = {"decode_step": 0, "decode_linear": 0, "decode_attention": 0, "sample_rows": 0}

    def counting(name):
        real = getattr(native, name)

        def call(*a, **k):
            y = real(*a, **k)
            calls[name] += y is not None
            return y

        return call

    for name in calls:
        monkeypatch.setattr(native, name, counting(name))
    fast = generate(model, prompts, params)
    assert calls["sample_rows"] == 12
    if fused:
        assert calls["decode_step"] == 11 and calls["decode_attention"] == 0
    else:
        assert calls["decode_step"] == 0 and calls["decode_attention"] == 11 * model.cfg.num_layers
    monkeypatch.setattr(native, "_state", "off")
    slow = generate(model, prompts, params)
    assert [g.tokens for g in fast.generations] == [g.tokens for g in slow.generations]
    for f, s in zip(fast.generations, slow.generations):
        torch.testing.assert_close(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-4, rtol=1e-4)


def decode_steps(model: MiniMind, ids, mask, steps, fast: str | None) -> tuple[list[torch.Tensor], KVCache]:
    """Prefill `ids` (B, T), then one decode step per column of `steps` (B, S), with the padding `mask`
    (B, T + S) or None: by the model (fast None) or by a FastDecoder with the given plan."""
    B, T = ids.shape
    cache = KVCache(model.cfg, B, T + steps.shape[1])
    decoder = FastDecoder(model)
    if fast is not None:
        assert decoder.plan is not None
        decoder.plan = fast
    outs = []
    with torch.no_grad():
        model(ids, attention_mask=None if mask is None else mask[:, :T], cache=cache)
        for i in range(steps.shape[1]):
            tok, m = steps[:, i : i + 1], None if mask is None else mask[:, : T + i + 1]
            outs.append(decoder.step(tok, m, cache) if fast else model(tok, attention_mask=m, cache=cache).logits[:, 0])
    return outs, cache


@needs_kernel
@pytest.mark.parametrize(
    "shape,rows",
    [(dict(hidden_size=50, num_heads=5, num_kv_heads=1, intermediate_size=70), 5),
     (dict(hidden_size=38, num_heads=2, num_kv_heads=1, head_dim=18, intermediate_size=29, qk_norm=True), 17),
     (dict(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=131, tie_word_embeddings=False), 1),
     (dict(hidden_size=24, num_heads=3, num_kv_heads=3, intermediate_size=40), 33)],
)  # fmt: skip
def test_fused_step_equals_torch_on_odd_shapes(shape, rows):
    """Sizes that are not multiples of the kernels' tiles (8 floats, 3 weight rows, 4 rows of x), head
    sizes 10, 18 and 64 (the register path), grouped and plain attention, an untied head: the fused step's
    logits over several padded steps equal the model's."""
    model = sharp_model("gqa", **shape)
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(1, 512, (rows, 6), generator=gen)
    mask = torch.ones(rows, 10, dtype=torch.long)
    mask[::2, :2] = 0  # every other row left-padded by 2
    steps = torch.randint(1, 512, (rows, 4), generator=gen)
    assert FastDecoder(model).plan == "fused"
    for f, s in zip(decode_steps(model, ids, mask, steps, "fused")[0], decode_steps(model, ids, mask, steps, None)[0]):
        torch.testing.assert_close(f, s, atol=2e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("kind", ["gqa", "qk_norm"])
def test_fused_step_equals_the_module_by_module_kernels(kind):
    """One fused call computes what the per-module kernels compute: logits and the cache rows written agree
    to float32 rounding (same products, same order; only SiLU's exp differs), over several padded steps."""
    model = sharp_model(kind)
    ids = torch.tensor([[0, 0, 5, 17, 42], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    steps = torch.tensor([[3, 4, 5, 6], [4, 5, 6, 7]])
    fused, fused_cache = decode_steps(model, ids, mask, steps, "fused")
    modules, module_cache = decode_steps(model, ids, mask, steps, "modules")
    for f, m in zip(fused, modules):
        torch.testing.assert_close(f, m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.k, module_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.v, module_cache.v, atol=1e-5, rtol=1e-5)
    assert fused_cache.length == module_cache.length == 9


@needs_kernel
def test_the_plan_follows_the_modules():
    """The fused step reads the model's own weights; a LoRA injection, a replaced norm or MoE take the
    module-by-module kernels; a replaced projection is read from where it is now; a forward hook or
    dropout in training leaves decoding to the model."""
    model = sharp_model("gqa")
    decoder = FastDecoder(model)
    assert decoder.plan == "fused" and len(decoder.weights) == native.STEP_WEIGHTS * model.cfg.num_layers
    assert decoder.weights[1] is model.layers[0].self_attn.q_proj.weight and decoder.weights[4] is None  # no q/k norm
    model.layers[1].mlp.up_proj = torch.nn.Linear(64, model.cfg.intermediate_size, bias=False)
    assert FastDecoder(model).weights[native.STEP_WEIGHTS + 9] is model.layers[1].mlp.up_proj.weight
    model.layers[1].mlp.up_proj = torch.nn.Linear(64, model.cfg.intermediate_size, bias=True)
    assert FastDecoder(model).plan == "modules"
    assert FastDecoder(lora_model()).plan == "modules"
    normless = sharp_model("gqa")
    normless.layers[0].input_layernorm = torch.nn.Identity()
    assert FastDecoder(normless).plan == "modules"
    assert FastDecoder(sharp_model("moe")).plan == "modules"
    hooked = sharp_model("gqa")
    hooked.layers[1].register_forward_pre_hook(lambda *a: None)
    assert FastDecoder(hooked).plan is None
    with torch.nn.modules.module.register_module_forward_hook(lambda *a: None):
        assert FastDecoder(model).plan is None
    dropout = MiniMind(tiny_config("gqa", dropout=0.1))
    assert FastDecoder(dropout.train()).plan is None and FastDecoder(dropout.eval()).plan == "fused"


def test_the_model_computes_the_same_way_in_every_grad_mode_and_batch_size(monkeypatch):
    """model.py is the spec: no native kernel runs under it, with or without gradients, at any row count
    (evaluation and reward scoring see the numbers training sees), and a cached decode step without
    gradients gives bit for bit what it gives with them."""

    def refuse(*a, **k):
        raise AssertionError("a native kernel ran under the model")

    for name in ("decode_step", "decode_linear", "decode_attention", "decode_rmsnorm"):
        monkeypatch.setattr(native, name, refuse)
    for kind in ("gqa", "qk_norm", "moe"):
        model = sharp_model(kind)
        ids = torch.tensor([[5, 17, 42, 9], [7, 8, 9, 10]])
        outs = []
        for grad in (True, False):
            cache = KVCache(model.cfg, 2, 5)
            with torch.set_grad_enabled(grad):
                model(ids, cache=cache)
                outs.append(model(torch.tensor([[3], [4]]), cache=cache).logits.detach())
                model(ids.repeat(20, 1))  # 40 rows
        assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_fused_step_applies_up_to_max_step_rows(monkeypatch):
    """Up to MAX_STEP_ROWS rows a decode step is one fused call (it is faster than torch there); beyond,
    the module-by-module kernels run, and both give the model's logits."""
    model = sharp_model("gqa")
    n = native.MAX_STEP_ROWS
    ids = torch.randint(0, 512, (n + 1, 5), generator=torch.Generator().manual_seed(0))
    fused = []
    real_step = native.decode_step
    monkeypatch.setattr(native, "decode_step", lambda *a: fused.append(real_step(*a)) or fused[-1])
    logits = {}
    for rows in (n, n + 1):
        fused.clear()
        logits[rows] = decode_steps(model, ids[:rows, :4], None, ids[:rows, 4:], "fused")[0][0]
        assert len(fused) == (rows <= n)
        reference = decode_steps(model, ids[:rows, :4], None, ids[:rows, 4:], None)[0][0]
        torch.testing.assert_close(logits[rows], reference, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[n], logits[n + 1][:n], atol=2e-4, rtol=1e-4)


@needs_kernel
def test_shapes_the_kernels_would_overrun_are_refused():
    """A cache made for another batch size, or a mask that does not cover the cache, gets a clear error
    from the model; the kernels themselves also refuse such a cache (they would read or write past the
    tensors)."""
    model = sharp_model("gqa")
    tokens = torch.tensor([[7], [10]])
    small = KVCache(model.cfg, 1, 8)
    small.length = 3
    with torch.no_grad(), pytest.raises(ValueError, match=r"does not fit 2 rows of this model \(2, 2, 2, \*, 16\)"):
        model(tokens, attention_mask=torch.ones(2, 4, dtype=torch.long), cache=small)
    deeper = KVCache(tiny_config("gqa", num_layers=8), 2, 8)
    deeper.length = 3
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache of shape"):
        model(tokens, attention_mask=torch.ones(2, 4, dtype=torch.long), cache=deeper)
    cache = KVCache(model.cfg, 2, 8)
    cache.length = 3
    with torch.no_grad(), pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        model(tokens, attention_mask=torch.ones(2, 3, dtype=torch.long), cache=cache)
    q, kv, cos = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.ones(2, 1, 1, 16)
    with torch.no_grad():
        assert native.decode_attention(q, kv, kv, cos, cos, small, 0, None) is None
        h, weights = torch.randn(2, 64), step_weights(model)
        args = (model.norm.weight, model.lm_head.weight, h, cos[:, 0, 0], cos[:, 0, 0])
        assert native.decode_step(weights, *args, None, small, 4, 2, 1e-5) is None
        assert native.decode_step(weights, *args, None, deeper, 4, 2, 1e-5) is None  # 8 layers, not 2
        assert native.decode_step(weights, *args, torch.ones(2, 3, dtype=torch.bool), cache, 4, 2, 1e-5) is None
        assert native.decode_step(weights, *args, torch.ones(2, 4, dtype=torch.bool), cache, 4, 2, 1e-5) is not None


def test_decoding_leaves_forward_hooks_and_masks_alone():
    """A forward hook makes the sampler decode with the model, so the hook runs at every step; the
    caller's attention mask is not modified by a native step."""
    model = sharp_model("gqa")
    seen = []
    handle = model.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    generate(model, [[5, 6], [7, 8, 9]], SamplingParams(max_new_tokens=4, temperature=0))
    assert [s[1] for s in seen] == [3, 1, 1, 1]  # the prefill, then every decode step
    handle.remove()
    cache = KVCache(model.cfg, 2, 8)
    mask = torch.tensor([[False, True, True, False], [True, True, True, False]])
    with torch.no_grad():
        model(torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=mask[:, :3], cache=cache)
        FastDecoder(model).step(torch.tensor([[1], [2]]), mask, cache)
    assert mask[:, -1].tolist() == [False, False]  # the new token sees itself, but not by writing here


@needs_kernel
def test_build_is_cached_and_keyed_by_the_source(fresh_native, monkeypatch):
    lib = native.build()
    assert lib.parent == fresh_native / "native" and lib.exists()
    stamp = lib.stat().st_mtime_ns
    assert native.build() == lib and lib.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(lib.parent.glob("*.tmp"))  # written under a temporary name, then renamed
    changed = fresh_native / "decode.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.build() != lib  # an edited source is a new library, never a stale one


@pytest.mark.skipif(not native.supported(), reason="the kernel is not tried on this platform")
def test_without_a_compiler_decoding_falls_back_to_torch(fresh_native, monkeypatch):
    """No compiler: one warning naming the cause, then torch; generation still works."""
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.warns(UserWarning, match="no-such-cc"):
        assert native.load() is None
    with torch.no_grad():
        assert native.decode_linear(torch.randn(2, 8), torch.randn(3, 8)) is None
    out = generate(sharp_model("gqa"), [[5, 6, 7]], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(out.generations[0].tokens) == 4


def test_switch_off(monkeypatch, fresh_native):
    monkeypatch.setenv("MINIMIND_NATIVE", "0")
    assert not native.supported()
    assert native.load() is None and not list(fresh_native.glob("**/*.so"))
