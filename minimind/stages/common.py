"""What every training stage shares: its flags, starting from a parent run, and the held-out check.

A stage file then says only what is special about it: its data, its model (e.g. LoRA-wrapped),
its loss and its defaults.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from minimind.checkpoint import RUN_INFO, Run, load_run
from minimind.config import TrainConfig, add_dataclass_args, merge_options, preset_of
from minimind.data.packing import Rows
from minimind.engine import LossFn, RunCheckpoint, Trainer, TrainResult, evaluate_loss, lm_loss
from minimind.errors import ConfigError
from minimind.tokenizer import Tokenizer


def add_stage_arguments(p: Any, data_help: str, parent: bool = True) -> None:
    """--from, --data, --eval-data, --config and every TrainConfig flag."""
    if parent:
        p.add_argument("--from", dest="parent", metavar="RUN_DIR", help="the run to start from")
    p.add_argument("--data", nargs="+", metavar="FILE", help=data_help)
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out data: loss before and after training")
    p.add_argument("--config", metavar="FILE.yaml", help="options from YAML; flags given here win")
    add_dataclass_args(p, TrainConfig, title="training")


def run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def saved_train_config(out: str | Path) -> dict[str, Any]:
    """The training options a run (or adapter) in `out` was started with."""
    from minimind.lora import ADAPTER_CONFIG

    for name in (RUN_INFO, ADAPTER_CONFIG):
        path = Path(out) / name
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8")).get("train_config", {})
            # The engine is not inherited: checkpoints do not depend on it, so a resume runs under the
            # engine it is launched with (FSDP saved, DDP or one process resumed, or the other way).
            known = {f.name for f in fields(TrainConfig)} - {"out", "resume", "fsdp", "zero", "deepspeed"}
            return {k: v for k, v in saved.items() if k in known}
    return {}


def stage_options(args: Any, defaults: dict[str, Any] | Callable[[TrainConfig], dict[str, Any]]) -> TrainConfig:
    """TrainConfig: field defaults < the stage's defaults < (with --resume) the options the run was
    started with < --config YAML < flags. `defaults` may depend on the options given (e.g. --from).
    Checks --data and --out."""
    given: TrainConfig = merge_options(args, TrainConfig)
    layer = defaults(given) if callable(defaults) else dict(defaults)
    if given.resume and given.out:
        layer.update(saved_train_config(given.out))  # resume continues with the same schedule
    cfg: TrainConfig = merge_options(args, TrainConfig, layer)
    cfg.validate()
    if not getattr(args, "data", None):
        raise ConfigError("--data FILE [FILE...] is required")
    if not cfg.out:
        raise ConfigError("--out RUN_DIR is required")
    return cfg


def start_from(cfg: TrainConfig, parent: str | None) -> Run:
    """The run to train: the parent (`--from`) for a new run, or the run itself with --resume."""
    out = Path(cfg.out)
    if cfg.resume:
        return load_run(out)
    if not parent:
        raise ConfigError("--from RUN_DIR is required (the run to start from), or --resume an existing --out")
    if (out / "train_state.pt").exists():
        raise ConfigError(f"{out} already holds a training run; use --resume to continue it or another --out")
    if Path(parent).resolve() == out.resolve():
        raise ConfigError("--out must differ from --from (the parent run is never overwritten)")
    return load_run(parent)


def stage_info(stage: str, cfg: TrainConfig, run: Run, args: Any, **extra: Any) -> dict[str, Any]:
    """What run.json records of a stage started from a parent run: its parent (kept across --resume),
    preset, data, tokenizer and seed, plus the stage's own options in `extra`."""
    parent = run.info.get("parent") if cfg.resume else (str(args.parent) if args.parent else None)
    return {
        "stage": stage,
        "parent": parent,
        "preset": preset_of(run.cfg),
        "data": [str(p) for p in args.data],
        "tokenizer": run.tokenizer.source,
        "seed": cfg.seed,
        **extra,
    }


def reference_model(policy: nn.Module, tok: Tokenizer, ref_dir: str | None) -> nn.Module:
    """A frozen reference (DPO, RL): a copy of the starting policy, or the run in ref_dir, which must
    share the policy's tokenizer. Eval mode, no gradients."""
    if ref_dir is None:
        ref = copy.deepcopy(policy)
    else:
        run = load_run(ref_dir)
        if run.tokenizer.vocab_size != tok.vocab_size or run.cfg.vocab_size != policy.cfg.vocab_size:
            raise ConfigError(f"--ref {ref_dir}: its vocabulary differs from the policy's (same tokenizer needed)")
        ref = run.model
    return ref.eval().requires_grad_(False)


def train(
    cfg: TrainConfig,
    run: Run,
    rows: Rows,
    info: dict[str, Any],
    eval_rows: Rows | None = None,
    loss_fn: LossFn = lm_loss,
    checkpoint: RunCheckpoint | None = None,
) -> tuple[Trainer, TrainResult]:
    """Fit with the engine, printing held-out loss before and after when eval rows are given."""
    trainer = Trainer(cfg, run.model.train(), run.tokenizer, rows, info, loss_fn, checkpoint)
    held_out = (lambda: f"{evaluate_loss(trainer.model, eval_rows):.4f}") if eval_rows is not None else None
    return trainer, fit_and_report(trainer, held_out, label="held-out loss")


def fit_and_report(
    trainer: Trainer, evaluate: Callable[[], str] | None, unit: str = "tokens", label: str = "held-out"
) -> TrainResult:
    """Fit with the engine; print the held-out measure (if any) before and after, and a summary
    (`unit`: what the engine's throughput counted, Batch.num_tokens).

    Under DDP every process runs the check (the same computation, no collectives) and rank 0 prints
    it: no process waits for another's check in a collective, however long it takes."""
    before = evaluate() if evaluate is not None else None
    if before is not None and trainer.rank == 0:
        print(f"{label} before: {before}", flush=True)
    result = trainer.fit()
    after = evaluate() if evaluate is not None else None
    if trainer.rank == 0:
        print(
            f"done: {result.steps} steps, {result.tokens:,} {unit} in {result.seconds:.0f} s "
            f"({result.tokens_per_s:,.0f} {unit}/s), final loss {result.final_loss:.4f} -> {trainer.out}"
        )
        if after is not None:
            print(f"{label} after: {after}", flush=True)
    return result
