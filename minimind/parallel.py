"""How the model is spread over the processes of a run: one process, DDP replicas, FSDP2 or ZeRO shards.

    one process     full weights, gradients and AdamW state here
    DDP (default    every process holds all of them; gradients are averaged by all-reduce in buckets
    when launched)  that overlap the backward pass. Fastest while everything fits on one GPU.
    FSDP2 --fsdp    `torch.distributed.fsdp.fully_shard` per transformer block and on the root: each
                    process keeps 1/N of the weights, gradients and AdamW moments (ZeRO-3 in DeepSpeed's
                    terms); a block's weights are all-gathered just before it runs and freed after,
                    gradients are reduce-scattered. Mixed precision policy on bf16 GPUs: bf16 compute
                    and all-gathers, fp32 master weights and gradient reduction.
    DeepSpeed       ZeRO stage 1 (AdamW state sharded), 2 (+ gradients), 3 (+ weights), with MiniMind's
    --zero N        AdamW as its client optimizer; DeepSpeed owns the step (see `DeepSpeed`).

The loop (minimind/engine.py) is the same for all: it asks the engine to wrap the model (and make the
optimizer over what it leaves), to skip the gradient sync on all but the last micro-batch, to run the
backward pass, to clip (the norm of sharded gradients needs a collective), and for state to save.
Checkpoints do not depend on the engine: rank 0 writes one consolidated `model.safetensors`, and the
optimizer state is saved full (gathered) and keyed by parameter name (torch.distributed.checkpoint's
state-dict API; DeepSpeed's `safe_get_full_*`), so a run saved under one engine resumes under another,
and under another number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
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


MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


class Engine:
    """One process, or DDP: every process holds the whole model."""

    name = "single"
    sharded = False  # weights live in pieces: whole weights need a gather (FSDP, DeepSpeed ZeRO-3)
    owns_step = False  # clipping, the optimizer step and skipping non-finite steps happen inside (DeepSpeed)

    def __init__(self, device: torch.device, world: int, dtype: torch.dtype, distributed: bool):
        self.device, self.world, self.dtype, self.distributed = device, world, dtype, distributed

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(the module the training step calls, the optimizer): `model` itself, wrapped, or sharded in
        place; the optimizer made over the parameters as the engine leaves them."""
        return model, make_optimizer(model)

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        yield

    def backward(self, train_model: nn.Module, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        scaler.scale(loss).backward()

    def finish_step(self, train_model: nn.Module) -> tuple[torch.Tensor, int]:
        """Engines that own the step: (its gradient norm, steps skipped so far)."""
        raise NotImplementedError

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

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), make_optimizer(model)

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        with contextlib.nullcontext() if on else train_model.no_sync():  # type: ignore[operator]
            yield


class FSDP(Engine):
    name = "fsdp"
    sharded = True

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
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
        return model, make_optimizer(model)  # over the sharded parameters

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


class DeepSpeed(Engine):
    """DeepSpeed ZeRO stage 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ weights), with
    MiniMind's own AdamW and schedule as DeepSpeed's client optimizer. DeepSpeed owns the step: it
    reduces (stage 1/2) or reduce-scatters (3) the gradients at the accumulation boundary the loop
    marks, clips, steps, and skips a step whose gradients are not finite (counted in `skipped_steps`).
    Checkpoints are written in the engines' common form (whole fp32 weights, optimizer state by
    name) through DeepSpeed's `safe_get_full_*` accessors, not in DeepSpeed's own sharded layout."""

    name = "deepspeed"
    owns_step = True

    def __init__(self, device: torch.device, world: int, dtype: torch.dtype, distributed: bool, config: dict):
        super().__init__(device, world, dtype, distributed)
        self.config = config
        self.sharded = config["zero_optimization"]["stage"] == 3
        self.groups: list[dict[str, Any]] = []  # the client optimizer's groups: hyperparameters, parameter names

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        optimizer = make_optimizer(model)
        offload = self.config["zero_optimization"].get("offload_optimizer") or {}
        if offload.get("device", "none") != "none":
            optimizer = cpu_adam(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        self.persistent = set(model.state_dict())  # keys a whole state dict has (parameters, buffers)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        return engine, ds_optimizer

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        train_model.set_gradient_accumulation_boundary(on)  # type: ignore[operator]
        yield

    def backward(self, train_model: nn.Module, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        train_model.backward(loss, scale_wrt_gas=False)  # type: ignore[operator] # the loss is normalised already
        train_model.step()  # type: ignore[operator] # steps only at the boundary

    def finish_step(self, train_model: nn.Module) -> tuple[torch.Tensor, int]:
        norm = train_model.get_global_grad_norm()  # type: ignore[operator]
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        return norm, int(train_model.skipped_steps)  # type: ignore[attr-defined]

    def _named(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return list(model.named_parameters(remove_duplicate=False))  # the tied head under both names

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        state = self.full_weights(model)
        return {k: v.cpu() for k, v in state.items()} if dist.get_rank() == 0 else None

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        state = {n: b for n, b in model.named_buffers() if n in self.persistent}
        named = self._named(model)
        # Trained weights: the fp32 masters of the optimizer. Frozen ones (LoRA's base) are in no
        # optimizer: gathered from the module itself (a no-op below ZeRO-3).
        state.update({n: safe_get_full_fp32_param(p).detach() for n, p in named if p.requires_grad})
        frozen = [(n, p) for n, p in named if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen]):
            state.update({n: p.detach().clone().float() for n, p in frozen})
        return state

    @staticmethod
    def _link(optimizer: torch.optim.Optimizer, create: bool = False) -> None:
        """The client AdamW creates its state at its first step, and ZeRO 1/2 link each parameter to
        its piece of that state then (a piece missing then stays unlinked). A resume loads the state
        before any step: `create` makes it (zeros), then every piece is linked again."""
        inner = optimizer.optimizer  # type: ignore[attr-defined]
        flats = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
        if flats is None:
            flats = getattr(optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3
        if create:
            for flat in flats:
                if not inner.state[flat]:
                    zeros = {k: torch.zeros_like(flat) for k in ("exp_avg", "exp_avg_sq")}
                    step = 0 if type(inner).__name__ == "DeepSpeedCPUAdam" else torch.tensor(0.0)  # its step: an int
                    inner.state[flat] = {"step": step, **zeros}
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            optimizer._hp_optimizer_states_linked = False  # type: ignore[attr-defined]
            optimizer._lazy_init_hp_params_optimizer_state()  # type: ignore[attr-defined]

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link(optimizer)
        inner = optimizer.optimizer  # type: ignore[attr-defined] # the client AdamW over DeepSpeed's flat partitions
        step = next(iter(inner.state.values()), {}).get("step", 0)
        step = torch.tensor(float(step), dtype=torch.float32)  # torch AdamW's form (CPU Adam keeps an int)
        state = {}
        for name in [n for g in self.groups for n in g["params"]]:
            p = model.get_parameter(name)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            state[name] = {"step": step.clone(), **{k: v.cpu() for k, v in moments.items()}}
        lr = optimizer.param_groups[0]["lr"]
        return {"state": state, "param_groups": [{**g, "lr": lr} for g in self.groups]}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if not by_name(state):
            raise CheckpointError(
                "train_state.pt was written before engines could share checkpoints (optimizer state by index); "
                "resume it without --zero/--deepspeed"
            )
        self._link(optimizer, create=True)
        step = None
        for name in [n for g in self.groups for n in g["params"]]:
            saved = state["state"][name]
            p = model.get_parameter(name)
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, saved[k].to(self.device), k)
            step = saved["step"]
        for s in optimizer.optimizer.state.values():  # type: ignore[attr-defined]
            count = float(step) if step is not None else 0.0
            s["step"] = int(count) if isinstance(s["step"], int) else torch.tensor(count, dtype=torch.float32)


def cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """ZeRO-Offload steps the optimizer on the CPU copies of the partitions. There DeepSpeed's CPU Adam
    (a SIMD, multi-threaded C++ op that DeepSpeed compiles once on first use) is several times faster
    than torch's AdamW; same update (decoupled weight decay, bias correction), same groups. If the op
    cannot be built (no C++ compiler), torch's AdamW steps the CPU partitions instead, and we say so."""
    import warnings

    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        first = optimizer.param_groups[0]
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        return DeepSpeedCPUAdam(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"], adamw_mode=True)
    except Exception as e:  # the JIT build of the op: a compiler or header missing
        message = str(e).strip().splitlines()[-1:] or [type(e).__name__]
        warnings.warn(
            f"DeepSpeed's CPU Adam could not be built ({message[0]}): torch's AdamW steps the offloaded state",
            stacklevel=2,
        )
        return optimizer


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's config: `--deepspeed FILE` (its zero_optimization, offload, communication options)
    or `--zero N`, with the batch, accumulation, clipping and precision always MiniMind's own flags."""
    config: dict[str, Any] = {}
    if cfg.deepspeed:
        try:
            with open(cfg.deepspeed, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--deepspeed {cfg.deepspeed}: not a readable JSON file ({e})") from None
        taken = sorted({"optimizer", "scheduler", "fp16"} & config.keys())
        if taken:
            raise ConfigError(
                f"--deepspeed {cfg.deepspeed}: remove {taken}: MiniMind's AdamW, schedule and precision are used "
                "(--lr, --warmup-steps, --dtype)"
            )
    zero = dict(config.get("zero_optimization", {}))
    if cfg.zero:
        zero["stage"] = cfg.zero
    if zero.get("stage") not in (1, 2, 3):
        raise ConfigError("--zero must be 1, 2 or 3 (or --deepspeed FILE with zero_optimization.stage)")
    config.update(
        zero_optimization=zero,
        train_micro_batch_size_per_gpu=cfg.batch_size,
        gradient_accumulation_steps=cfg.accumulation,
        gradient_clipping=cfg.grad_clip,
        bf16={"enabled": dtype == torch.bfloat16},
        zero_allow_untested_optimizer=True,  # MiniMind's torch AdamW (fused where it can be), or CPU Adam
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=config.get("steps_per_print", 10**9),
    )
    return config


def choose(cfg: TrainConfig, device: torch.device, world: int, dtype: torch.dtype, distributed: bool) -> Engine:
    """The engine the options ask for, or a one-line ConfigError saying what to do instead."""
    if cfg.fsdp and (cfg.zero or cfg.deepspeed):
        raise ConfigError("--fsdp and --zero/--deepspeed are two engines: choose one")
    if cfg.zero or cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("--zero/--deepspeed need DeepSpeed: `pip install deepspeed`") from None
        config = deepspeed_config(cfg, dtype)  # a bad config is a bad input, launched or not
        if not distributed:
            raise ConfigError(
                "--zero/--deepspeed shard training over the processes of a launched job: run under "
                "`deepspeed --num_gpus N --module minimind ...` or `torchrun --nproc_per_node N -m minimind ...`"
            )
        if dtype == torch.float16:
            raise ConfigError("--zero/--deepspeed with float16 is not supported: use --dtype bfloat16 or float32")
        if cfg.compile:
            raise ConfigError("--compile with DeepSpeed is not supported: drop one of them")
        return DeepSpeed(device, world, dtype, distributed, config)
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
