"""The native decode kernels (minimind/csrc/decode.c) against torch: values, determinism, when they are
used, and the fallback when they cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_model

from minimind import native
from minimind.generate import SamplingParams, generate

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


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d,length", [(8, 2, 64, 161), (4, 4, 16, 1), (6, 3, 12, 40)])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_kernel_equals_sdpa_on_cache_views(heads, kv_heads, d, length, padded):
    """One query per row against (B, KVH, L, D) views of a longer cache buffer, grouped-query, with a
    left-padding mask, equals F.scaled_dot_product_attention."""
    gen = torch.Generator().manual_seed(length + d)
    B = 5
    q = torch.randn(B, heads, 1, d, generator=gen)
    cache_k, cache_v = (torch.randn(3, B, kv_heads, length + 7, d, generator=gen) for _ in range(2))
    k, v = cache_k[1, :, :, :length], cache_v[1, :, :, :length]  # what KVCache.update returns
    mask = None
    if padded:
        keep = torch.ones(B, length, dtype=torch.bool)
        for b in range(B):
            keep[b, : min(b * 3, length - 1)] = False  # row b has b * 3 pads on the left, last key kept
        mask = keep[:, None, None, :]
    with torch.no_grad():
        y = native.decode_attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    assert y is not None
    torch.testing.assert_close(y, ref, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_attention_kernel_is_used_only_where_it_applies():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with torch.no_grad():
        assert native.decode_attention(q, k, v, None) is not None
        assert native.decode_attention(torch.randn(2, 4, 2, 8), k, v, None) is None  # two queries: prefill
        assert native.decode_attention(q, k, v, torch.zeros(2, 1, 1, 5)) is None  # additive float mask
        assert native.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, None) is None
        assert native.decode_attention(q.double(), k.double(), v.double(), None) is None
    assert native.decode_attention(q, k, v, None) is None  # autograd on


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
    q = torch.zeros(1, 1, 1, L)
    q[..., 0] = 1
    k = torch.zeros(1, 1, L, L)
    k[0, 0, :, 0] = -torch.linspace(0, 100, L) * L**0.5  # score of key l: -100 l / (L - 1)
    v = torch.eye(L).reshape(1, 1, L, L)
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
    mask[..., 3] = False
    with torch.no_grad():
        y = native.decode_attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert y is not None and y[0, 0, 0, 3] == 0
    torch.testing.assert_close(y, ref, atol=1e-7, rtol=1e-5)


@needs_kernel
def test_sampling_kernel_draws_what_the_torch_draw_does():
    """Same logits and uniforms: the same tokens as `generate.draw` and the log-softmax of each (rows
    with -inf entries, a row with one allowed token, u at 0 and next to 1 included); frequencies
    over many draws follow softmax(logits)."""
    from minimind.generate import draw

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 6400, generator=gen) * 3
    logits[1, :100] = float("-inf")
    logits[2] = float("-inf")
    logits[2, 4321] = 0.5
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    u[3], u[4] = 0.0, 1 - 2**-53
    with torch.no_grad():
        tokens, logp = native.sample_rows(logits, u)
    ref_logp = logits.log_softmax(-1)
    ref = draw(ref_logp.exp(), u)
    assert (tokens == ref).float().mean() >= 0.95  # a draw can land on a boundary that rounding moves
    assert tokens[2] == 4321 and tokens[1] >= 100 and logp[2] == 0
    torch.testing.assert_close(logp, ref_logp.gather(-1, tokens[:, None]).squeeze(-1), atol=2e-6, rtol=1e-5)
    small = torch.tensor([[0.0, 1.0, float("-inf"), -1.0]])
    n = 100_000
    with torch.no_grad():
        picks, _ = native.sample_rows(small.expand(n, -1), torch.rand(n, generator=gen, dtype=torch.float64))
    freq = torch.bincount(picks, minlength=4).double() / n
    p = small[0].softmax(-1).double()
    assert freq[2] == 0 and ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), freq


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


@needs_kernel
def test_decoding_with_the_kernel_matches_torch(monkeypatch):
    """The model's decode steps go through both kernels (counted) and give torch's log-probs and tokens,
    left-padded rows included."""
    model = sharp_model("gqa")
    prompts = [[5, 17, 42, 9], [7, 7, 100], [300, 12, 13, 14, 15, 16]]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=1.0, seed=4)
    calls = {"decode_linear": 0, "decode_attention": 0}

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
    assert calls["decode_linear"] > 0 and calls["decode_attention"] == 11 * model.cfg.num_layers
    monkeypatch.setattr(native, "_state", "off")
    slow = generate(model, prompts, params)
    assert [g.tokens for g in fast.generations] == [g.tokens for g in slow.generations]
    for f, s in zip(fast.generations, slow.generations):
        torch.testing.assert_close(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_build_is_cached_and_keyed_by_the_source(fresh_native):
    lib = native.build()
    assert lib.parent == fresh_native / "native" and lib.exists()
    stamp = lib.stat().st_mtime_ns
    assert native.build() == lib and lib.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(lib.parent.glob("*.tmp"))  # written under a temporary name, then renamed


@pytest.mark.skipif(not native.supported(), reason="the kernel is not tried on this platform")
def test_without_a_compiler_decoding_falls_back_to_torch(fresh_native, monkeypatch):
    """No compiler: one warning naming the cause, then torch's matmul; generation still works."""
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
