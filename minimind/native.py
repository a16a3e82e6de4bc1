"""A native fast path for decoding on x86-64 CPUs: `decode_linear`, a few rows against a large weight.

A decode step multiplies one row per sequence (16 in an RL rollout) by every weight matrix. BLAS
kernels are tuned for many rows and reach a quarter to a half of the CPU's peak there, and the step is
mostly these products, so `csrc/decode_gemm.c` (one AVX2 kernel, ~100 lines) does them instead. It is
compiled on first use with the system C compiler into a cache folder and loaded with ctypes; its OpenMP
threads are torch's own (the library `torch` already loaded), sized by `torch.get_num_threads()`.

Where it cannot help or cannot build (not Linux x86-64 with AVX2, no C compiler, gradients wanted,
other dtypes or devices, more than `MAX_ROWS` rows) `decode_linear` returns None and the caller uses
`F.linear`. `MINIMIND_NATIVE=0` turns it off; `MINIMIND_CACHE` moves the cache (default
~/.cache/minimind). The kernel is checked against F.linear in tests/test_native.py.
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

import torch

SOURCE = Path(__file__).parent / "csrc" / "decode_gemm.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 32  # beyond this BLAS is as fast (and prefill / training shapes never come here)

_kernel: ctypes._CFuncPtr | None = None
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
    lib = out_dir / f"decode_gemm-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load() -> ctypes._CFuncPtr | None:
    """The kernel, built and loaded on first call; None (with one warning) when it cannot be."""
    global _kernel, _state
    if _state == "unloaded":
        _state = "off"
        if supported():
            try:
                fn = ctypes.CDLL(str(build())).decode_gemm
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
                fn.restype = None
                _kernel, _state = fn, "ready"
            except (OSError, RuntimeError) as e:
                warnings.warn(f"native decode kernel unavailable, using torch's matmul: {e}", stacklevel=2)
    return _kernel


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) by the native kernel, or None where it does not apply."""
    if (
        _state == "off"
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.numel() > MAX_ROWS * x.shape[-1]
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or not weight.is_contiguous()
        or weight.device.type != "cpu"
    ):
        return None
    kernel = _kernel or load()
    if kernel is None:
        return None
    K, N = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty((x2.shape[0], N), dtype=torch.float32)
    kernel(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), x2.shape[0], N, K, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], N)
