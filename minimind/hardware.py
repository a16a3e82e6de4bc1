"""The machine a run trains on: its device, process group, precision and compiler, each checked up
front with an error that says what to do (`--device cuda` without a GPU, bf16 on hardware that only
emulates it, `--compile` without Triton or a C++ compiler, more processes than GPUs).
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from minimind.config import TrainConfig
from minimind.errors import ConfigError
from minimind.inference import resolve_device

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def training_device(name: str) -> torch.device:
    """The device to train on; one that this machine does not have is a ConfigError saying what to do."""
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"--device {name}: no CUDA GPU is visible (torch {torch.__version__} is {build}); "
                "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 ...)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def process_group_backend(device: torch.device) -> str:
    """NCCL for the CUDA tensors (gradients, losses, counts), with gloo beside it for the few Python
    objects gathered at checkpoints; gloo alone on CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def launched() -> bool:
    """Started by a distributed launcher (torchrun, deepspeed), even with one process."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun or deepspeed: a process group and one GPU per process
    (LOCAL_RANK), also at world size 1 (DDP and its collectives run; the GPU check uses that)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = training_device(device_name)
    if not launched() and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible: start at most that many "
                "processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    return dist.get_rank(), world, device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX on x86-64, BF16 on ARM)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        if f is not None and f():
            return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags or "bf16" in flags


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: Ampere and newer GPUs (compute capability 8.0+); T4 and V100 only emulate it."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_bf16()
    return device.type == "mps"


def precision(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on GPUs with bf16 hardware, fp16 with loss scaling on older GPUs (T4, V100),
    fp32 elsewhere (the fast path on CPUs). bf16 asked for where the hardware only emulates it is refused."""
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if has_native_bf16(device) else torch.float16
        return torch.float32
    dtype = getattr(torch, cfg.dtype)
    if dtype == torch.bfloat16 and not has_native_bf16(device):
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"this {device.type}"
        hint = "--dtype float16 (with loss scaling)" if device.type == "cuda" else "--dtype float32"
        raise ConfigError(f"--dtype bfloat16: {what} has no bf16 hardware (emulated bf16 is slow); use {hint}")
    return dtype


def check_compile(device: torch.device) -> None:
    """--compile needs Triton on CUDA and a C++ compiler on CPU; say so in one line instead of a traceback
    at the first step."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("--compile on CUDA needs Triton (`pip install triton`); or drop --compile")
    elif device.type == "cpu":
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            raise ConfigError("--compile on CPU needs a C++ compiler (g++ or clang++); install one or drop --compile")
    else:
        raise ConfigError(f"--compile is not supported on {device.type}; drop --compile")


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU (for MFU), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
