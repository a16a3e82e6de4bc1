"""A native fast path for decoding on x86-64 CPUs: matmuls, attention, RMSNorm and sampling of one step.

A decode step multiplies one row per sequence (16 in an RL rollout) by every weight matrix, then
attends from one query per row to the cache. BLAS kernels are tuned for many rows and reach a quarter
to a half of the CPU's peak at 16, and torch's attention kernels spend most of a one-query call in
overheads; together that was two thirds of a step (RMSNorm, a chain of small ops in torch, another
twentieth). Sampling from the logits, a few passes over (rows, vocabulary) in torch with large
temporaries that glibc hands back to the OS and faults in again every step, took another 1.4 ms.
`csrc/decode.c` (AVX2 kernels, ~350 lines) does these instead. It is compiled on first
use with the system C compiler into a cache folder and loaded with ctypes; its OpenMP threads are
torch's own (the runtime `torch` already loaded), sized by `torch.get_num_threads()`.

Once the module calls themselves were a third of a step (~100 Python calls, each ~15-50 us), a dense
model's whole decode step became one call, `decode_step`, in one parallel region; the per-module
kernels remain for what it does not cover (LoRA-wrapped projections, MoE). `minimind.fastdecode` runs
a model's decode step through these functions; the sampler chooses it.

Where it cannot help or cannot build (not Linux x86-64 with AVX2, no C compiler, autograd on,
other dtypes or devices, more than `MAX_ROWS` rows (`MAX_STEP_ROWS` for the fused step), more than
one query per row, shapes that do not fit) the functions return None and the caller uses torch.
`MINIMIND_NATIVE=0` turns it off; `MINIMIND_CACHE` moves the cache (default ~/.cache/minimind).
Every kernel is checked against torch in tests/test_native.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minimind.model import KVCache

SOURCE = Path(__file__).parent / "csrc" / "decode.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 32  # beyond this BLAS is as fast (and prefill / training shapes never come here)
# The fused step stays ahead of torch further: at 128 rows (an RL micro-batch) 1.4x on the `tiny` preset
# and even on minimind2-small, at 64 rows 1.6x and 1.15x; at 256 rows torch is ahead (1.4x on the latter).
MAX_STEP_ROWS = 128
STEP_WEIGHTS = 11  # weights per layer that decode_step reads (decode.c's enum)

_kernel: ctypes.CDLL | None = None
_state = "unloaded"  # unloaded | ready | off


def supported() -> bool:
    """Linux on x86-64 with AVX2 (what the kernel is written for), and not switched off."""
    if os.environ.get("MINIMIND_NATIVE", "1") == "0":
        return False
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cache_dir() -> Path:
    return Path(os.environ.get("MINIMIND_CACHE") or Path.home() / ".cache" / "minimind") / "native"


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source and flags) and return the shared library's path.

    The library is written to a temporary name and renamed, so processes building at the same time
    (DDP ranks, parallel tests) never load a half-written file.
    """
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; set CC)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"decode-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load() -> ctypes.CDLL | None:
    """The kernels, built and loaded on first call; None (with one warning) when they cannot be."""
    global _kernel, _state
    if _state == "unloaded":
        _state = "off"
        if supported():
            try:
                lib = ctypes.CDLL(str(build()))
                ptr, long = ctypes.c_void_p, ctypes.c_long
                lib.decode_gemm.argtypes = [ptr] * 3 + [long] * 3 + [ctypes.c_int]
                lib.decode_attention.argtypes = [ptr] * 9 + [long] * 7 + [ctypes.c_float, ptr, ctypes.c_int]
                lib.decode_rmsnorm.argtypes = [ptr] * 3 + [long] * 2 + [ctypes.c_float]
                lib.sample_rows.argtypes = [ptr, long, long] + [ptr] * 4 + [ctypes.c_int]
                lib.decode_step.argtypes = [ptr, long] + [ptr] * 7 + [long] * 3 + [ptr] * 3 + [long] * 8 + [
                    ctypes.c_float, ptr, ctypes.c_int]  # fmt: skip
                lib.decode_step_scratch.argtypes = [long] * 7 + [ctypes.c_int]
                lib.decode_step_scratch.restype = long
                for fn in (lib.decode_gemm, lib.decode_attention, lib.decode_rmsnorm, lib.sample_rows, lib.decode_step):
                    fn.restype = None
                _kernel, _state = lib, "ready"
            except (OSError, RuntimeError) as e:
                warnings.warn(f"native decode kernels unavailable, torch does their work: {e}", stacklevel=2)
    return _kernel if _state == "ready" else None


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) by the native kernel, or None where it does not apply.

    Called ~60 times per decode step, so the checks are the cheap ones first (attribute lookups on
    tensors cost a microsecond each here, the kernel itself 20-400).
    """
    if _state == "off" or torch.is_grad_enabled() or x.dtype is not torch.float32 or not x.is_cpu:
        return None
    K = x.shape[-1]
    rows = x.numel() // K
    if rows > MAX_ROWS or weight.dtype is not torch.float32 or not weight.is_cpu or not weight.is_contiguous():
        return None
    lib = _kernel or load()
    if lib is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    N = weight.shape[0]
    y = torch.empty(x.shape[:-1] + (N,), dtype=torch.float32)
    lib.decode_gemm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, N, K, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    layer: int,
    mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """One decode step's attention by the native kernel, or None where it does not apply: RoPE on q and
    k, k and v written into `cache` at position `cache.length`, then softmax(q k^T / sqrt(d)) v over the
    cache, grouped-query. What the model does with apply_rope, KVCache.update and
    F.scaled_dot_product_attention, in one call.

    q: (B, 1, H, D), k, v: (B, 1, KVH, D) as projected; cos, sin: (B or 1, 1, 1, D) from RotaryEmbedding;
    mask: None or a boolean (B, 1, 1, length + 1), True where a key may be seen. Returns (B, H, D).
    Without padding, positions are shared: cos and sin may have batch size 1.
    """
    B, T, H, D = q.shape
    KVH, L = k.shape[2], cache.length + 1
    if (
        _state == "off"
        or T != 1
        or torch.is_grad_enabled()
        or q.device.type != "cpu"
        or not (q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype == cache.k.dtype == torch.float32)
        or H % KVH
        or L > cache.max_len
        or cache.k.shape[1:3] != (B, KVH)  # a cache of other shapes: torch raises the error
        or cache.k.shape[-1] != D
        or not (cache.k.is_contiguous() and cache.v.is_contiguous())
        or (mask is not None and mask.dtype != torch.bool)
    ):
        return None
    lib = _kernel or load()
    if lib is None:
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cos, sin = (t.expand(B, 1, 1, D).reshape(B, D).contiguous() for t in (cos, sin))  # (1, ...) unpadded
    keep = None if mask is None else mask.expand(B, 1, 1, L).reshape(B, L).contiguous()
    kc, vc = cache.k[layer], cache.v[layer]  # (B, KVH, max_len, D)
    out = torch.empty((B, H, D), dtype=torch.float32)
    threads = torch.get_num_threads()
    scratch = torch.empty((threads, L + D), dtype=torch.float32)
    lib.decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
        None if keep is None else keep.data_ptr(), out.data_ptr(),
        B, H, KVH, L, D, kc.stride(0), kc.stride(1), D**-0.5, scratch.data_ptr(), threads,
    )  # fmt: skip
    return out


def decode_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension by the native kernel, or None."""
    if (
        _state == "off"
        or x.device.type != "cpu"
        or not (x.dtype == weight.dtype == torch.float32)
        or x.numel() > MAX_ROWS * 16 * x.shape[-1]  # single-threaded: decode rows (and q/k-norm heads) only
        or torch.is_grad_enabled()
        or not weight.is_contiguous()
    ):
        return None
    lib = _kernel or load()
    if lib is None:
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.decode_rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def decode_step(
    weights: list[torch.Tensor | None],
    norm: torch.Tensor,
    head: torch.Tensor,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keep: torch.Tensor | None,
    cache: KVCache,
    heads: int,
    kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole decode step of a dense model in one kernel call, or None where it does not apply:
    (logits (M, V), final hidden states (M, D)) for the new tokens' embeddings h (M, D), which it
    overwrites; the cache gets their keys and values at position `cache.length`.

    What the modules compute with the kernels above, one Python call instead of ~100 (a third of a
    step at batch 16). weights: per layer, the STEP_WEIGHTS tensors of `fastdecode.step_weights` (decode.c's
    order); cos, sin: (M, Dh) at each row's position; keep: None or bool (M, length + 1), True where a
    key may be seen.
    """
    M, D = h.shape
    Dh, L = cos.shape[-1], cache.length + 1
    if _state == "off" or torch.is_grad_enabled() or M > MAX_STEP_ROWS or h.dtype is not torch.float32 or not h.is_cpu:
        return None
    if (  # shapes the kernel would read or write past: the modules' path raises torch's error instead
        cache.k.shape != (len(weights) // STEP_WEIGHTS, M, kv_heads, cache.max_len, Dh)
        or len(weights) % STEP_WEIGHTS
        or heads % kv_heads
        or L > cache.max_len
        or not h.is_contiguous()
        or (keep is not None and (keep.shape != (M, L) or keep.dtype != torch.bool))
    ):
        return None
    for t in (*weights, norm, head, cache.k, cache.v):
        if t is not None and (t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous()):
            return None
    lib = _kernel or load()
    if lib is None:
        return None
    layers, F, V = cache.k.shape[0], weights[8].shape[0], head.shape[0]  # weights[8]: the first gate
    threads = torch.get_num_threads()
    cos, sin = cos.expand(M, Dh).contiguous(), sin.expand(M, Dh).contiguous()
    if keep is not None:
        keep = keep.contiguous()
    scratch = torch.empty(lib.decode_step_scratch(M, D, heads, kv_heads, Dh, F, L, threads), dtype=torch.float32)
    hidden, logits = torch.empty(M, D, dtype=torch.float32), torch.empty(M, V, dtype=torch.float32)
    ptrs = (ctypes.c_void_p * len(weights))(*[None if t is None else t.data_ptr() for t in weights])
    lib.decode_step(
        ptrs, layers, norm.data_ptr(), head.data_ptr(), h.data_ptr(), hidden.data_ptr(), logits.data_ptr(),
        cache.k.data_ptr(), cache.v.data_ptr(), cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        cos.data_ptr(), sin.data_ptr(), None if keep is None else keep.data_ptr(),
        M, D, heads, kv_heads, Dh, F, V, L, eps, scratch.data_ptr(), threads,
    )  # fmt: skip
    return logits, hidden


def sample_rows(logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens, log-probs) drawn by inverse CDF from softmax(logits) (B, V) with one uniform per row
    u (B,) float64, by the native kernel (what `minimind.generate.draw` does in torch), or None."""
    if (
        _state == "off"
        or logits.device.type != "cpu"
        or logits.dtype != torch.float32
        or logits.dim() != 2
        or u.dtype != torch.float64
        or torch.is_grad_enabled()
    ):
        return None
    lib = _kernel or load()
    if lib is None:
        return None
    logits, u = logits.contiguous(), u.contiguous()
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64)
    logp = torch.empty(B, dtype=torch.float32)
    threads = min(torch.get_num_threads(), B)
    scratch = torch.empty((threads, V), dtype=torch.float32)
    lib.sample_rows(
        logits.data_ptr(), B, V, u.data_ptr(), tokens.data_ptr(), logp.data_ptr(), scratch.data_ptr(), threads
    )
    if int(tokens.min()) < 0:
        raise ValueError("the model's logits contain NaN (diverged or corrupted weights?): nothing to sample from")
    return tokens, logp
