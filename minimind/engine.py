"""The one training loop. Every stage hands it a model, rows of data and a loss; nothing else differs.

Per optimizer step: take `accumulation` micro-batches (each process its slice of the global
batch), count the loss tokens of the whole step across processes, backpropagate
sum-loss / step-tokens per micro-batch (so accumulation and data parallelism give exactly the
gradient of one big batch), clip, step AdamW, follow warmup + cosine to a floor. Logs a progress
line and `metrics.jsonl`; saves checkpoints that survive a crash at any point (minimind/checkpoint.py);
`--resume` continues bit-for-bit, also under another number of processes (the global batch is kept).

A non-finite gradient norm is never applied: AdamW's fused kernel skips that update on the device
(no host sync), and at the next log or save every process learns of it from one all-reduce and all
stop together, before anything is written. On GPUs every collective runs on the training device's
tensors, and nothing in a step waits for the device (losses, norms and counts are read at log time).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minimind import seconds_since_start
from minimind.checkpoint import (
    atomic_write,
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    publish_checkpoint,
)
from minimind.config import TrainConfig
from minimind.data.batch import Batch, Rows
from minimind.errors import CheckpointError, ConfigError, MiniMindError
from minimind.hardware import check_compile, peak_flops, precision, setup_distributed
from minimind.losses import token_cross_entropy_sum
from minimind.model import MiniMind
from minimind.optim import lr_at, make_optimizer
from minimind.parallel import choose, replica
from minimind.sources import BatchSource, RowBatches, RunCheckpoint, Runtime
from minimind.tokenizer import Tokenizer
from minimind.tracking import append_metrics, open_trackers, plot, trim_metrics

STATE = "train_state.pt"

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


def on_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it (in dicts, lists, tuples) moved to the CPU, for train_state.pt."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


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
        rows: Rows | None,
        info: dict[str, Any],
        loss_fn: LossFn = lm_loss,
        checkpoint: RunCheckpoint | None = None,
        source: Callable[[Runtime], BatchSource] | None = None,
        validate: Callable[[], dict[str, float]] | None = None,
    ):
        """`source(runtime)` builds where batches come from, once the model is on its device and wrapped
        (default: RowBatches over `rows`); the RL stages pass one that generates rollouts (and no rows).
        `validate()` measures the model on held-out data (e.g. {"val_loss", "val_bpb"}); with
        --eval-every N the loop logs it every N steps and at the end, on every process alike."""
        if rows is None and source is None:
            raise ValueError("the Trainer needs rows or a batch source")
        cfg.validate()
        if cfg.eval_every and validate is None:
            raise ConfigError("--eval-every needs --eval-data (held-out documents or conversations) on this stage")
        self.validate = validate
        self.budget = cfg.time_budget()
        self.cfg, self.tokenizer, self.rows, self.info, self.loss_fn = cfg, tokenizer, rows, info, loss_fn
        self.checkpoint = checkpoint or RunCheckpoint()
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.distributed = dist.is_initialized()  # DDP and collectives (also for one launched process)
        self.dtype = precision(cfg, self.device)
        if cfg.compile:
            check_compile(self.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls on Ampere and newer
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)  # master weights stay float32; autocast lowers the math
        self.model.grad_checkpointing = cfg.grad_checkpointing
        resume = self.read_state() if cfg.resume else None
        if resume is not None:
            self._keep_global_batch(resume)
        self.engine = choose(cfg, self.device, self.world, self.dtype, self.distributed)
        if resume is not None:
            self.load_weights(resume)
        # FSDP2 / DeepSpeed: a plain copy of the model, loaded with the gathered weights when whole weights
        # are needed: on rank 0 (CPU) to write consolidated checkpoints with the stage's own writer; on
        # every rank (on the device) for RL under sharded weights, where each process samples its
        # rollouts alone (a sharded model would need every process in every forward pass, and
        # generations end at different lengths).
        # Counted before any sharding leaves a process with pieces (ZeRO-3's parameters report 0 elements).
        self.param_count = self.model.num_params()
        self.flops_per_token = self.model.estimate_mfu(1.0, cfg.max_seq_len, 1.0)
        samples_whole = source is not None and self.engine.sharded
        writes_whole = self.rank == 0 and (self.engine.sharded or self.engine.owns_step)
        self.replica = None
        if samples_whole or writes_whole:
            self.replica = replica(self.model, self.device if samples_whole else torch.device("cpu"))
        # Wrap (DDP) or shard (FSDP) before the optimizer sees the parameters, then compile: the
        # compiled graph is split at DDP's gradient buckets, so each all-reduce overlaps the backward.
        self.wrapped, self.optimizer = self.engine.wrap(self.model, lambda m: make_optimizer(m, cfg, self.device))
        self.train_model: nn.Module = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.runtime = Runtime(
            cfg, tokenizer, self.device, self.dtype, self.rank, self.world, self.model, self.train_model,
            self.sampling_model,
        )  # fmt: skip
        if source is not None:
            self.source: BatchSource = source(self.runtime)
        else:
            assert rows is not None  # checked above
            self.source = RowBatches(rows, cfg, self.rank, self.world)
        self.max_steps = cfg.max_steps or cfg.epochs * self.source.steps_per_epoch()
        self.total_steps = self.max_steps  # with --max-time: re-estimated as the run goes (fit_budget)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # seconds that earlier processes of this run used (--resume)
        self.last_save_s = 0.0
        self.last_eval_s = 0.0
        self.metric_sums: dict[str, torch.Tensor] = {}  # stage metrics, summed over the log window
        self.skipped = torch.zeros((), device=self.device)  # steps whose gradient norm was not finite
        if resume is not None:
            self.load_state(resume)
        self.trackers = open_trackers(cfg, self.out) if self.rank == 0 else []

    # ---- one optimizer step --------------------------------------------------------------------

    def step_counts(self, micro: list[Batch]) -> torch.Tensor:
        """[loss units, tokens] of the whole step, all processes: what the loss sums are divided by
        (loss tokens, pairs, or token weights) and what throughput counts. Known on the host before
        the step; under DDP summed by one all-reduce on the training device (no host sync: the
        result stays there and divides the loss as a tensor)."""
        counts = torch.tensor([sum(b.loss_units for b in micro), sum(b.num_tokens for b in micro)], dtype=torch.float64)
        if not self.distributed:
            return counts
        if self.device.type == "cuda":
            counts = counts.pin_memory()
        counts = counts.to(self.device, non_blocking=True)
        dist.all_reduce(counts)
        return counts

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss of this process, grad norm, [loss units, tokens] of the whole step); tensors
        that the loop reads only when it logs."""
        micro = self.source.next_step(self.step)
        counts = self.step_counts(micro)
        # DDP averages gradients over processes, so each divides by units / world.
        denom = float(counts[0]) if not self.distributed else (counts[0] / self.world).float()
        c = self.cfg
        lr = lr_at(self.step, self.total_steps, self.warmup, c.lr, c.min_lr_ratio, c.schedule, c.decay_share)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_total = torch.zeros((), device=self.device)
        mixed = autocast(self.device, self.dtype)
        for i, batch in enumerate(micro):
            with self.engine.gradient_sync(self.wrapped, on=i == len(micro) - 1):
                with mixed:
                    loss_sum, aux, *extra = self.loss_fn(self.train_model, batch.to(self.device))
                loss = loss_sum / denom + aux / len(micro)
                self.engine.backward(self.wrapped, loss, self.scaler)
            loss_total += loss_sum.detach()
            for k, v in (extra[0] if extra else {}).items():
                self.metric_sums[k] = self.metric_sums.get(k, 0) + v.detach().double()
        if self.engine.owns_step:  # DeepSpeed clipped, stepped (or skipped a non-finite step) in backward
            grad_norm, skipped = self.engine.finish_step(self.wrapped)
            self.skipped.fill_(skipped)
        else:
            self.scaler.unscale_(self.optimizer)
            # After DDP's all-reduce every process holds the same gradients (FSDP: the norm of the shards
            # is reduced), hence the same norm and the same decision below.
            grad_norm = self.engine.clip(self.model, self.cfg.grad_clip or float("inf"))
            self.apply_update(grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_total, grad_norm, counts

    def apply_update(self, grad_norm: torch.Tensor) -> None:
        """optimizer.step(), unless the gradient norm is not finite: then the weights and the optimizer
        state stay as they were and the step is counted in `skipped` (read at the next check)."""
        if self.scaler.is_enabled():  # fp16: the scaler skips overflowing steps and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        bad = ~torch.isfinite(grad_norm)
        self.skipped += bad
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW reads `found_inf` on the device and skips the whole update (moments and step
            # count included) when it is 1: no host sync. (It is how GradScaler drives fused optimizers.)
            self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif not bool(bad):
            self.optimizer.step()

    # ---- the loop ------------------------------------------------------------------------------

    @property
    def warmup(self) -> int:
        """--warmup-steps, or 1% of the (current estimate of the) run's steps."""
        return self.cfg.warmup_steps if self.cfg.warmup_steps >= 0 else max(1, self.total_steps // 100)

    def elapsed(self) -> float:
        """Seconds this run has used: since the command started, plus earlier processes' (--resume)."""
        return self.elapsed_before + seconds_since_start()

    def fit_budget(self, first_step: int, first_done: float) -> None:
        """--max-time: set total_steps to the steps that still fit in the budget, at the pace of this
        process's steps after its first (evaluations, logging and saves included), keeping back the time
        of the final evaluation and save. Under several processes rank 0's estimate is shared at log
        steps (the all-reduce there), so every process stops at the same step."""
        done = self.step - first_step - 1
        if self.budget is None or done < 1:
            return
        pace = (self.elapsed() - first_done) / done
        # the final save (and plot) until one is measured: ~16 bytes a parameter (weights, optimizer
        # state) at 200 MB/s and a second, or one step if that is less
        finish = self.last_save_s or min(pace, 1.0 + 16 * self.param_count / 2e8)
        left = self.budget - self.elapsed() - self.last_eval_s - finish
        total = min(self.max_steps, max(self.step + math.floor(left / pace), self.step))
        if self.distributed:
            if self.step % self.cfg.log_every:
                return
            shared = torch.tensor([total if self.rank == 0 else 0], device=self.device)
            dist.all_reduce(shared)
            total = int(shared)
        self.total_steps = total

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            trim_metrics(self.out, self.step)
            c = self.model.cfg
            budget = f" (or as many as fit in --max-time {cfg.max_time})" if self.budget is not None else ""
            print(
                f"training {self.param_count / 1e6:.2f}M params ({c.num_layers}x{c.hidden_size}) on "
                f"{self.device} {str(self.dtype).replace('torch.', '')} x{self.world}: {self.total_steps} steps"
                f"{budget} of {self.source.describe()}{f', resuming at step {self.step}' if self.step else ''}"
            )
        start, window_start = time.perf_counter(), time.perf_counter()
        window_loss = torch.zeros((), device=self.device)
        window = torch.zeros(2, dtype=torch.float64, device=self.device if self.distributed else "cpu")
        run_tokens, last_loss = 0, float("nan")
        first_step, first_done = self.step, 0.0
        while self.step < self.total_steps:
            loss_sum, grad_norm, counts = self.train_step()
            window_loss += loss_sum
            window += counts
            if self.step == first_step + 1:
                first_done = self.elapsed()
            self.fit_budget(first_step, first_done)
            is_last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or is_last:
                if self.distributed:
                    dist.all_reduce(window_loss)
                    for v in self.metric_sums.values():
                        dist.all_reduce(v)
                self.check_finite(window_loss)
                window_units, window_tokens = window.tolist()
                window_tokens = int(window_tokens)
                run_tokens += window_tokens
                self.tokens_seen += window_tokens
                last_loss = float(window_loss) / max(window_units, 1e-9)
                self._window_units = window_units
                source_metrics = self.source_metrics()
                seconds = time.perf_counter() - window_start
                self._log(
                    last_loss, float(grad_norm), window_tokens / seconds, time.perf_counter() - start, first_step,
                    source_metrics,
                )  # fmt: skip
                window_loss.zero_()
                window.zero_()
                self.metric_sums = {}
                window_start = time.perf_counter()
            if self.validate is not None and cfg.eval_every and (self.step % cfg.eval_every == 0 or is_last):
                self.log_validation()
            if (cfg.save_every and self.step % cfg.save_every == 0) or is_last:
                self.check_finite(loss_sum)
                t = time.perf_counter()
                self.save()
                self.last_save_s = time.perf_counter() - t
        seconds = time.perf_counter() - start
        if self.rank == 0:
            plot(self.out, f"{self.out.name}: {self.info.get('stage', 'training')}")
        for t in self.trackers:
            t.close()
        return TrainResult(self.step, last_loss, run_tokens, seconds, run_tokens / max(seconds, 1e-9))

    def log_validation(self) -> None:
        """validate() on every process (the same computation; no process waits in a collective for
        another's), logged by rank 0 with the run's elapsed seconds at the moment it was measured."""
        t = time.perf_counter()
        metrics = self.validate() if self.validate is not None else {}
        self.last_eval_s = time.perf_counter() - t
        if self.rank != 0:
            return
        record = {"step": self.step, **{k: round(v, 6) for k, v in metrics.items()}}
        record |= {"tokens": self.tokens_seen, "elapsed_s": round(self.elapsed() - self.last_eval_s, 2)}
        print(
            f"eval step {self.step}/{self.total_steps} | "
            + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + f" | at {record['elapsed_s']:.0f} s",
            flush=True,
        )
        append_metrics(self.out, record)
        for tracker in self.trackers:
            tracker.log(record, self.step)

    def source_metrics(self) -> dict[str, float]:
        """The batch source's own metrics since the last log (RL: rewards, lengths), averaged over processes."""
        metrics = self.source.log_metrics()
        if self.distributed and metrics:
            keys = sorted(metrics)
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            metrics = dict(zip(keys, (values / self.world).tolist()))
        return metrics

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop, on every process at once, if a loss or a gradient norm since the start was not finite.
        One all-reduce of [steps skipped, loss] makes every process decide on the same numbers (a NaN
        on any one process makes the sum NaN everywhere)."""
        flags = torch.stack([self.skipped.float(), loss.detach().float().reshape(())])
        if self.distributed:
            dist.all_reduce(flags)
        skipped, total = flags.tolist()
        skipped = round(skipped / self.world) if self.distributed else round(skipped)  # each process counts them
        if not skipped and math.isfinite(total):
            return
        folder = latest_checkpoint(self.out)
        where = f"{self.out / self.checkpoint.weights} (step {checkpoint_step(folder)})" if folder else None
        what = f"loss is {total}" if not math.isfinite(total) else f"gradient norm was not finite in {skipped} step(s)"
        raise TrainingError(
            f"{what} at step {self.step}; stopped without saving (no non-finite update was applied). Last good "
            f"checkpoint: {where or 'none was written yet'}. Try a lower --lr or --dtype float32."
        )

    def _log(
        self,
        loss: float,
        grad_norm: float,
        tokens_per_s: float,
        elapsed: float,
        first_step: int,
        source_metrics: dict[str, float],
    ) -> None:
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
            "elapsed_s": round(self.elapsed(), 2),
        }
        line = (
            f"step {self.step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
            f"{tokens_per_s:,.0f} tok/s"
        )
        record.update({k: round(v, 6) for k, v in source_metrics.items()})
        line += "".join(f" | {k} {record[k]:.4g}" for k in [*self.metric_sums, *source_metrics])
        peak = peak_flops(self.device)
        if peak:
            record["mfu"] = round(self.flops_per_token * tokens_per_s / (peak * self.world), 4)
            line += f" | MFU {record['mfu']:.1%}"
        print(line + f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        append_metrics(self.out, record)
        for t in self.trackers:
            t.log(record, self.step)

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        """A complete checkpoint folder for this step (the stage's run directory plus train_state.pt),
        then published as the run's latest (minimind/checkpoint.py: a crash at any point keeps the
        previous one). Every process hands rank 0 its own RNG states and batch-source state."""
        # Collectives first, on every process: FSDP gathers the full weights and optimizer state to rank 0.
        weights = self.engine.model_state(self.model) if self.engine.sharded or self.engine.owns_step else None
        optimizer = self.engine.optimizer_state(self.model, self.optimizer)
        mine = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "source": on_cpu(self.source.state_dict()),  # e.g. an RL rollout's log-probs, kept on the GPU
        }
        ranks: list[Any] | None = [mine]
        if self.distributed:
            ranks = [None] * self.world if self.rank == 0 else None
            dist.gather_object(mine, ranks, dst=0)
        if self.rank != 0:
            return
        folder = checkpoint_dir(self.out, self.step)
        if folder is None:
            return  # this very step is saved already
        info = {
            **self.info,
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens_seen,
            "train_config": asdict(self.cfg),
        }
        with self.consolidated(weights):
            self.checkpoint.save(self, folder, info, {"step": str(self.step)})
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "world": self.world,
            "engine": self.engine.name,
            "global_batch": self.cfg.batch_size * self.cfg.accumulation * self.world,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "rng": [{"torch": r["torch_rng"], "cuda": r["cuda_rng"]} for r in ranks],
            "sources": [r["source"] for r in ranks],
        }
        atomic_write(folder / STATE, lambda tmp: torch.save(state, tmp))
        publish_checkpoint(self.out, folder)

    def read_state(self) -> dict[str, Any]:
        """train_state.pt of the last complete checkpoint (its folder under "folder"), after checking
        that the weights beside it are from the same step."""
        from safetensors import safe_open

        folder = latest_checkpoint(self.out) or self.out  # runs saved before checkpoint folders: the top
        path = folder / STATE
        if not path.is_file():
            raise CheckpointError(
                f"{self.out}: nothing to resume (no complete checkpoint); drop --resume to start fresh"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = folder / self.checkpoint.weights
        with safe_open(str(weights), "pt") as f:
            weights_step = int((f.metadata() or {}).get("step", -1))
        if weights_step != state["step"]:
            raise CheckpointError(
                f"{folder}: {weights.name} is from step {weights_step} but train_state.pt "
                f"from step {state['step']} (interrupted save?); cannot resume exactly"
            )
        if "sources" not in state:  # written before per-process states
            state["rng"] = [{"torch": state["torch_rng"], "cuda": None}]
            state["sources"] = [state["sampler"]]
        state["folder"] = folder
        return state

    def _keep_global_batch(self, state: dict[str, Any]) -> None:
        """Resuming under another number of processes: keep the global batch (and so the schedule and
        the data position) by changing --accumulation, else --batch-size; refuse when neither can."""
        c, saved_world, total = self.cfg, state.get("world", 1), state.get("global_batch")
        if total is None or c.batch_size * c.accumulation * self.world == total:
            return
        per_process = total // self.world if total % self.world == 0 else 0
        if per_process and per_process % c.batch_size == 0:
            c.accumulation = per_process // c.batch_size
        elif per_process and per_process % c.accumulation == 0:
            c.batch_size = per_process // c.accumulation
        else:
            raise ConfigError(
                f"--resume: this run's global batch is {total} (batch size x accumulation x {saved_world} "
                f"processes), which {self.world} processes cannot split evenly; resume with a process count "
                f"that divides {total}, or set --batch-size and --accumulation so that their product x "
                f"{self.world} = {total}"
            )
        if self.rank == 0:
            print(
                f"resuming a run of {saved_world} process(es) on {self.world}: --batch-size {c.batch_size} "
                f"--accumulation {c.accumulation} keep the global batch of {total}"
            )

    def sampling_model(self) -> nn.Module:
        """The model to generate with, whole on this process: the model itself, or under FSDP the replica
        loaded with the current weights (one all-gather per call: call it once per rollout)."""
        if not self.engine.sharded:
            return self.model
        assert self.replica is not None
        self.replica.load_state_dict(self.engine.full_weights(self.model))
        return self.replica

    @contextlib.contextmanager
    def consolidated(self, weights: dict[str, torch.Tensor] | None) -> Any:
        """Inside, `self.model` is a plain model with the full weights (FSDP: rank 0's replica loaded
        with the gathered state), so the stage's checkpoint writer needs to know nothing of sharding."""
        if weights is None or self.replica is None:
            yield
            return
        self.replica.load_state_dict(weights)
        sharded, self.model = self.model, self.replica
        try:
            yield
        finally:
            self.model = sharded

    def load_weights(self, state: dict[str, Any]) -> None:
        """The checkpoint's weights, into the plain model (before it is wrapped or sharded)."""
        if self.rank == 0 and state["folder"] != self.out:
            publish_checkpoint(self.out, state["folder"])  # finishes a publish that a crash cut short
        self.checkpoint.load(self, state["folder"])
        self.model.to(self.device)

    def load_state(self, state: dict[str, Any]) -> None:
        """Optimizer, scaler, this process's RNG and batch-source state, step (weights: load_weights)."""
        self.engine.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        same_world = len(state["sources"]) == self.world
        # Under another world size the sources' shared part (sampler position, trackers) is rank 0's;
        # what only one process had (e.g. an unfinished rollout) is dropped by the source itself.
        try:
            self.source.load_state_dict(state["sources"][self.rank if same_world else 0])
        except ValueError as e:
            raise CheckpointError(f"{state['folder'] / STATE}: {e}") from None
        rng = state["rng"][self.rank % len(state["rng"])]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
