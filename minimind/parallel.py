"""How the model is spread over the processes of a run: one process, DDP replicas, or FSDP2 shards.

    one process     full weights, gradients and AdamW state here
    DDP (default    every process holds all of them; gradients are averaged by all-reduce in buckets
    when launched)  that overlap the backward pass. Fastest while everything fits on one GPU.
    FSDP2 --fsdp    `torch.distributed.fsdp.fully_shard` per transformer block and on the root: each
                    process keeps 1/N of the weights, gradients and AdamW moments (ZeRO-3 in DeepSpeed's
                    terms); a block's weights are all-gathered just before it runs and freed after,
                    gradients are reduce-scattered. Mixed precision policy on bf16 GPUs: bf16 compute
                    and all-gathers, fp32 master weights and gradient reduction.

The loop (minimind/engine.py) is the same for all: it asks the engine to wrap the model, to skip the
gradient sync on all but the last micro-batch, to clip (the norm of sharded gradients needs a
collective), and for state to save. Checkpoints do not depend on the engine: rank 0 writes one
consolidated `model.safetensors`, and the optimizer state is saved full (gathered) and keyed by
parameter name (torch.distributed.checkpoint's state-dict API), so a run saved under one engine
resumes under another, and under another number of processes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minimind.config import TrainConfig
from minimind.errors import CheckpointError, ConfigError


def state_dict_api() -> Any:
    import torch.distributed.checkpoint.state_dict as api

    return api


def by_name(state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (else by index: saved before engines)."""
    return any(isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))


class Engine:
    """One process, or DDP: every process holds the whole model."""

    name = "single"

    def __init__(self, device: torch.device, world: int, dtype: torch.dtype, distributed: bool):
        self.device, self.world, self.dtype, self.distributed = device, world, dtype, distributed

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (may be `model` itself, wrapped, or sharded in place)."""
        return model

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        yield

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm (identical on every process), after clipping to `max_norm`."""
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None elsewhere). Every process must call it (FSDP gathers)."""
        return model.state_dict()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state keyed by parameter name (on rank 0; every process must call it)."""
        api = state_dict_api()
        return api.get_optimizer_state_dict(model, optimizer, options=api.StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not by_name(state):  # written before engines: by index, the same parameter order as now
            optimizer.load_state_dict(state)
            return
        api = state_dict_api()
        api.set_optimizer_state_dict(model, optimizer, state, options=api.StateDictOptions(full_state_dict=True))


class DDP(Engine):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        with contextlib.nullcontext() if on else train_model.no_sync():  # type: ignore[operator]
            yield


class FSDP(Engine):
    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from minimind.model import Block

        mesh = init_device_mesh(self.device.type, (self.world,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.dtype == torch.bfloat16
            else MixedPrecisionPolicy()
        )
        for module in model.modules():  # every transformer block (of every model: PPO has two)
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, heads
        return model

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        train_model.set_requires_gradient_sync(on)  # type: ignore[operator]
        yield

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        api = state_dict_api()
        options = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = api.get_model_state_dict(model, options=options)
        return state if dist.get_rank() == 0 else None

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole weights on every process, on the device (an all-gather of every shard)."""
        api = state_dict_api()
        return api.get_model_state_dict(model, options=api.StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        api = state_dict_api()
        options = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return api.get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not by_name(state):
            raise CheckpointError(
                "train_state.pt was written before engines could share checkpoints (optimizer state by index); "
                "resume it without --fsdp"
            )
        super().load_optimizer_state(model, optimizer, state)


def choose(cfg: TrainConfig, device: torch.device, world: int, dtype: torch.dtype, distributed: bool) -> Engine:
    """The engine the options ask for, or a one-line ConfigError saying what to do instead."""
    if cfg.fsdp:
        if not distributed:
            raise ConfigError(
                "--fsdp shards the model over the processes of a launched job: run under "
                "`torchrun --nproc_per_node N -m minimind ...`, or drop --fsdp"
            )
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise ConfigError(f"--fsdp needs FSDP2 (torch >= 2.6; this is {torch.__version__})") from None
        if dtype == torch.float16:
            raise ConfigError("--fsdp with float16 loss scaling is not supported: use --dtype bfloat16 or float32")
        return FSDP(device, world, dtype, distributed)
    return DDP(device, world, dtype, distributed) if distributed else Engine(device, world, dtype, distributed)


def replica(model: nn.Module, device: torch.device) -> nn.Module:
    """A plain copy of a model, taken before it is sharded (see Trainer.replica)."""
    return copy.deepcopy(model).to(device)
