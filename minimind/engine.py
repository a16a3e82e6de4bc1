"""The one training loop. Every stage hands it a model, rows of data and a loss; nothing else differs.

Per optimizer step: take `accumulation` micro-batches (each process its slice of the global
batch), count the loss tokens of the whole step across processes, backpropagate
sum-loss / step-tokens per micro-batch (so accumulation and data parallelism give exactly the
gradient of one big batch), clip, step AdamW, follow warmup + cosine to a floor. Logs a progress
line and `metrics.jsonl`; saves the run directory and `train_state.pt` atomically; `--resume`
continues bit-for-bit; a non-finite loss stops training before anything bad is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from minimind.checkpoint import WEIGHTS, atomic_write, atomic_write_text, save_run
from minimind.config import TrainConfig
from minimind.data.packing import Batch, Rows, Sampler
from minimind.errors import CheckpointError, ConfigError, MiniMindError
from minimind.generate import resolve_device
from minimind.losses import token_cross_entropy_sum
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

STATE = "train_state.pt"
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

# A stage's loss: (sum of per-unit losses, MoE balance loss) or, with metrics to log, also a dict of
# per-unit sums (e.g. DPO's reward margin summed over pairs). Units are what Batch.loss_units counts.
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, ...]]


class TrainingError(MiniMindError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint on disk is intact."""


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss: (sum of token cross-entropies, MoE balance loss)."""
    out = model(batch.input_ids, segment_ids=batch.segment_ids)
    return token_cross_entropy_sum(out.logits, batch.labels), out.aux_loss


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """The engine's precision policy (autocast to `dtype`, off for float32), for forward passes
    outside its loop: reference models, teachers, rollouts."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to lr * min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms), fused kernels where the device has them."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: nccl on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def precision(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, cfg.dtype)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, rows: Rows, batch_size: int = 16, max_rows: int = 256, device: torch.device | None = None
) -> float:
    """Mean next-token cross-entropy (nats/token) over the first `max_rows` rows."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    n = min(len(rows), max_rows)
    for start in range(0, n, batch_size):
        batch = rows.batch(torch.arange(start, min(n, start + batch_size)).numpy())
        loss_sum, _ = lm_loss(model, batch.to(device))
        total, count = total + float(loss_sum), count + batch.num_tokens
    model.train(was_training)
    return total / max(count, 1)


class RunCheckpoint:
    """Where a stage's weights go: a full run directory (weights, config, tokenizer, run.json).

    Stages that train only part of a model (LoRA) pass a subclass that writes just that part.
    The weights file carries the step in its metadata, so resume can check it against train_state.pt.
    """

    weights = WEIGHTS

    def save(self, trainer: Trainer, info: dict[str, Any], metadata: dict[str, str]) -> None:
        save_run(trainer.out, trainer.model, trainer.tokenizer, info, weights_metadata=metadata)

    def load(self, trainer: Trainer) -> None:
        from minimind.checkpoint import load_weights

        load_weights(trainer.model, trainer.out / WEIGHTS)


class BatchSource(Protocol):
    """Where each optimizer step's micro-batches come from. Its state goes into train_state.pt."""

    def steps_per_epoch(self) -> int: ...

    def next_step(self) -> list[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RowBatches:
    """The default source: `accumulation` global batches of rows per step, in a seeded shuffled order
    (a fresh one each epoch); every process draws the global batch and keeps its slice."""

    def __init__(self, rows: Rows, cfg: TrainConfig, rank: int, world: int):
        self.rows, self.cfg, self.rank, self.world = rows, cfg, rank, world
        self.sampler = Sampler(len(rows), cfg.seed)

    def steps_per_epoch(self) -> int:
        per_step = self.cfg.batch_size * self.cfg.accumulation * self.world
        if len(self.rows) < per_step:
            raise ConfigError(
                f"the data has {len(self.rows)} rows of {self.cfg.max_seq_len} tokens, fewer than one step "
                f"needs ({per_step}); lower --batch-size/--accumulation or set --max-steps"
            )
        return len(self.rows) // per_step

    def describe(self) -> str:
        """What one optimizer step consumes (the trainer's start line)."""
        c = self.cfg
        return (
            f"{c.batch_size}x{c.accumulation}x{self.world} rows x {c.max_seq_len} tokens "
            f"({len(self.rows)} rows in the data)"
        )

    def next_step(self) -> list[Batch]:
        B = self.cfg.batch_size
        out = []
        for _ in range(self.cfg.accumulation):
            rows = self.sampler.take(B * self.world)
            out.append(self.rows.batch(rows[self.rank * B : (self.rank + 1) * B]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    seconds: float
    tokens_per_s: float


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: MiniMind,
        tokenizer: Tokenizer,
        rows: Rows,
        info: dict[str, Any],
        loss_fn: LossFn = lm_loss,
        checkpoint: RunCheckpoint | None = None,
        source: Callable[[Trainer], BatchSource] | None = None,
    ):
        """`source(trainer)` builds where batches come from, once the device is set up (default:
        RowBatches over `rows`); the RL stages pass one that generates rollouts."""
        cfg.validate()
        self.cfg, self.tokenizer, self.rows, self.info, self.loss_fn = cfg, tokenizer, rows, info, loss_fn
        self.checkpoint = checkpoint or RunCheckpoint()
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.dtype = precision(cfg, self.device)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)  # master weights stay float32; autocast lowers the math
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.source = source(self) if source else RowBatches(rows, cfg, self.rank, self.world)
        self.total_steps = cfg.max_steps or cfg.epochs * self.source.steps_per_epoch()
        self.warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, self.total_steps // 100)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.tokens_seen = 0
        self.metric_sums: dict[str, torch.Tensor] = {}  # stage metrics, summed over the log window
        if cfg.resume:
            self.load_state()
        self.train_model: nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)
        self.trackers = self._trackers() if self.rank == 0 else []

    # ---- one optimizer step --------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(summed loss of this process, grad norm, loss units and tokens of the whole step)."""
        micro = self.source.next_step()
        # What the loss sums are divided by (loss tokens, pairs, or token weights), and the tokens
        # throughput counts: both for the whole step, all processes.
        step = torch.tensor([sum(b.loss_units for b in micro), sum(b.num_tokens for b in micro)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(step)
        units, tokens = float(step[0]), int(step[1])
        denom = units / self.world  # DDP averages gradients over processes
        lr = lr_at(self.step, self.total_steps, self.warmup, self.cfg.lr, self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_total = torch.zeros((), device=self.device)
        mixed = autocast(self.device, self.dtype)
        for i, batch in enumerate(micro):
            sync = self.world == 1 or i == len(micro) - 1
            no_sync = contextlib.nullcontext() if sync else self.train_model.no_sync()
            with no_sync:
                with mixed:
                    loss_sum, aux, *extra = self.loss_fn(self.train_model, batch.to(self.device))
                loss = loss_sum / denom + aux / len(micro)
                self.scaler.scale(loss).backward()
            loss_total += loss_sum.detach()
            for k, v in (extra[0] if extra else {}).items():
                self.metric_sums[k] = self.metric_sums.get(k, 0) + v.detach().double()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_total, grad_norm, units, tokens

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
            c = self.model.cfg
            print(
                f"training {self.model.num_params() / 1e6:.2f}M params ({c.num_layers}x{c.hidden_size}) on "
                f"{self.device} {str(self.dtype).replace('torch.', '')} x{self.world}: {self.total_steps} steps "
                f"of {self.source.describe()}{f', resuming at step {self.step}' if self.step else ''}"
            )
        start, window_start = time.perf_counter(), time.perf_counter()
        window_loss = torch.zeros((), device=self.device)
        window_units, window_tokens, run_tokens, last_loss = 0.0, 0, 0, float("nan")
        first_step = self.step
        while self.step < self.total_steps:
            loss_sum, grad_norm, units, tokens = self.train_step()
            window_loss += loss_sum
            window_units += units
            window_tokens += tokens
            run_tokens += tokens
            self.tokens_seen += tokens
            is_last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or is_last:
                if self.world > 1:
                    dist.all_reduce(window_loss)
                last_loss = float(window_loss) / max(window_units, 1e-9)
                self._window_units = window_units
                if self.world > 1:
                    for v in self.metric_sums.values():
                        dist.all_reduce(v)
                self._check_finite(last_loss)
                elapsed = time.perf_counter() - window_start
                self._log(last_loss, float(grad_norm), window_tokens / elapsed, time.perf_counter() - start, first_step)
                window_loss.zero_()
                self.metric_sums = {}
                window_units, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if (cfg.save_every and self.step % cfg.save_every == 0) or is_last:
                self._check_finite(float(loss_sum))
                self.save()
        seconds = time.perf_counter() - start
        if self.rank == 0:
            self.plot()
        for t in self.trackers:
            t.close() if hasattr(t, "close") else t.finish()
        return TrainResult(self.step, last_loss, run_tokens, seconds, run_tokens / max(seconds, 1e-9))

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            where = (
                f"{self.out / self.checkpoint.weights}"
                if (self.out / STATE).exists()
                else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"loss is {loss} at step {self.step}; stopped without saving. Last good "
                f"checkpoint: {where}. Try a lower --lr or --dtype float32."
            )

    def _log(self, loss: float, grad_norm: float, tokens_per_s: float, elapsed: float, first_step: int) -> None:
        if self.rank != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        done = self.step - first_step
        eta = elapsed / max(done, 1) * (self.total_steps - self.step)
        record = {
            "step": self.step,
            "loss": round(loss, 6),
            **{k: round(float(v) / max(self._window_units, 1e-9), 6) for k, v in self.metric_sums.items()},
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens": self.tokens_seen,
            "elapsed_s": round(elapsed, 2),
        }
        line = (
            f"step {self.step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s"
        )
        source_metrics = self.source.log_metrics() if hasattr(self.source, "log_metrics") else {}
        record.update({k: round(v, 6) for k, v in source_metrics.items()})
        line += "".join(f" | {k} {record[k]:.4g}" for k in [*self.metric_sums, *source_metrics])
        peak = self._peak_flops()
        if peak:
            record["mfu"] = round(self.model.estimate_mfu(tokens_per_s, self.cfg.max_seq_len, peak * self.world), 4)
            line += f" | MFU {record['mfu']:.1%}"
        print(line + f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for t in self.trackers:
            if hasattr(t, "add_scalar"):
                for k, v in record.items():
                    t.add_scalar(f"train/{k}", v, self.step)
            else:
                t.log(record, step=self.step)

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    def _trackers(self) -> list[Any]:
        trackers: list[Any] = []
        if self.cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--wandb needs `pip install wandb`") from None
            trackers.append(
                wandb.init(project="minimind", name=self.out.name, config=asdict(self.cfg), dir=str(self.out))
            )
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs `pip install tensorboard`") from None
            trackers.append(SummaryWriter(str(self.out / "tensorboard")))
        return trackers

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        """Run directory (weights tagged with the step) then train_state.pt, each atomically."""
        if self.rank != 0:
            return
        info = {
            **self.info,
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens_seen,
            "train_config": asdict(self.cfg),
        }
        self.checkpoint.save(self, info, {"step": str(self.step)})
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.source.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        atomic_write(self.out / STATE, lambda tmp: torch.save(state, tmp))

    def load_state(self) -> None:
        """Weights from model.safetensors, everything else from train_state.pt; both must be the same step."""
        from safetensors import safe_open

        path = self.out / STATE
        if not path.is_file():
            raise CheckpointError(f"{path}: nothing to resume (no train_state.pt); drop --resume to start fresh")
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = self.out / self.checkpoint.weights
        with safe_open(str(weights), "pt") as f:
            weights_step = int((f.metadata() or {}).get("step", -1))
        if weights_step != state["step"]:
            raise CheckpointError(
                f"{self.out}: {weights.name} is from step {weights_step} but train_state.pt "
                f"from step {state['step']} (interrupted save?); cannot resume exactly"
            )
        self.checkpoint.load(self)
        self.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        try:
            self.source.load_state_dict(state["sampler"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]

    def _trim_metrics(self) -> None:
        """On resume, drop logged steps after the checkpoint (they will be trained again)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= self.step
        ]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def plot(self) -> Path | None:
        """loss.png from metrics.jsonl (skipped when matplotlib is missing)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{self.out.name}: {self.info.get('stage', 'training')}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out / "loss.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        return path
