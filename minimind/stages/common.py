"""What the training stages share: flags, options, starting from a parent run, the defaults by
preset, rows of conversations (SFT, LoRA, reasoning, distillation) and of preference pairs (DPO, the
reward model), and the held-out check. RL's setup is beside it in `rl_common.py`.

This is the stages' shared layer: a stage file imports it, the engine and the library, never another
stage file (tests/test_architecture.py). A stage file then says only what is special about it: its
data, its model (e.g. LoRA-wrapped), its loss and its defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minimind.checkpoint import CONFIG, RUN_INFO, Run, load_config, load_run
from minimind.config import TrainConfig, preset_of
from minimind.data.batch import Rows
from minimind.data.chat import ChatRows, show_mask, tokenize_conversations
from minimind.data.preference import PairBatch, PairRows, read_preferences
from minimind.engine import STATE, LossFn, RunCheckpoint, Trainer, TrainResult, autocast, lm_loss
from minimind.errors import ConfigError
from minimind.heldout import HeldOut
from minimind.options import add_options, merge_options, opt
from minimind.tokenizer import Tokenizer

# ---- defaults by preset -----------------------------------------------------------------------

# Default SFT learning rate by preset. Upstream uses 5e-7 (MiniMind2, trainer/train_full_sft.py at
# 0323815) and 1e-5 (minimind-3); on our demo data 5e-7 leaves a model where it was, so ours are
# higher. docs/sft.md has the table.
SFT_LR = {
    "tiny": 2e-3,
    "tiny-moe": 2e-3,
    "minimind2-small": 2e-5,
    "minimind2": 1e-5,
    "minimind2-moe": 1e-5,
    "minimind3": 1e-5,
    "minimind3-moe": 1e-5,
}

# Default DPO learning rate by preset. Upstream uses 4e-8 (trainer/train_dpo.py): the loss stays at
# log 2 = 0.693 (measured: 0.692 after 40 steps on minimind2-small). tiny and minimind2-small are
# measured on the demo pairs, the larger presets scaled down from them. docs/preference.md has them.
DPO_LR = {
    "tiny": 1e-4,
    "tiny-moe": 1e-4,
    "minimind2-small": 1e-6,
    "minimind2": 5e-7,
    "minimind2-moe": 5e-7,
    "minimind3": 5e-7,
    "minimind3-moe": 5e-7,
}


# Pretraining defaults by preset. minimind2-small's come from the time-to-loss sweeps (NOTES.md,
# BENCHMARKS.md "Time to loss": Muon at 2e-3 on a WSD schedule reached upstream's one-epoch held-out
# loss in a quarter of its time; AdamW at 5e-4 or 2e-3 did not). The other full-size presets take the
# same (Muon's update is scaled to AdamW's RMS per matrix shape, so its rate carries over; not swept).
# The tiny presets keep AdamW and a cosine: the demo and the tests are tuned on them.
MUON_WSD = {"optimizer": "muon", "schedule": "wsd", "lr": 2e-3}
PRETRAIN: dict[str, dict[str, Any]] = {
    "minimind2-small": MUON_WSD,
    "minimind2": MUON_WSD,
    "minimind2-moe": MUON_WSD,
    "minimind3": MUON_WSD,
    "minimind3-moe": MUON_WSD,
}


@dataclass(frozen=True)
class Defaults:
    """A stage's defaults: its training options, and its learning rate by the preset (shape) of the
    run it trains (`lrs`; `default_lr` for other shapes). They sit below --resume's saved options,
    --config and flags (`stage_options`)."""

    options: dict[str, Any]
    lrs: dict[str, float]
    default_lr: float

    def but(self, **changes: Any) -> Defaults:
        return dataclasses.replace(self, **changes)

    def for_run(self, run_dir: str | Path | None) -> dict[str, Any]:
        """The options, with the learning rate for the run in `run_dir` (none yet: `default_lr`)."""
        if not run_dir or not (Path(run_dir) / CONFIG).is_file():
            return {**self.options, "lr": self.default_lr}
        return {**self.options, "lr": self.lrs.get(preset_of(load_config(run_dir)) or "", self.default_lr)}


SFT = Defaults({"batch_size": 16, "accumulation": 1, "epochs": 2, "weight_decay": 0.0}, SFT_LR, 1e-5)
# Upstream: batch 4 pairs, 1 epoch, max_seq_len 1024. Rows are padded per batch, so a long
# max_seq_len costs nothing for short pairs.
DPO = Defaults(
    {"batch_size": 8, "accumulation": 1, "epochs": 1, "weight_decay": 0.0, "max_seq_len": 1024}, DPO_LR, 5e-7
)


# ---- flags, options, the run to train -----------------------------------------------------------


def add_stage_arguments(p: Any, data_help: str, parent: bool = True, defaults: Defaults | None = None) -> None:
    """--from, --data, --eval-data, --config and every TrainConfig flag (its help shows the stage's
    `defaults`)."""
    if parent:
        p.add_argument("--from", dest="parent", metavar="RUN_DIR", help="the run to start from")
    p.add_argument("--data", nargs="+", metavar="FILE", help=data_help)
    p.add_argument(
        "--eval-data",
        nargs="+",
        metavar="FILE",
        help="held-out data: loss (RL: rewards) before and after training; pretrain/sft/lora: also every --eval-every",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="options from YAML; flags given here win")
    shown = None if defaults is None else {**defaults.options, "lr": "by the run's preset (docs)"}
    add_options(p, TrainConfig, "training", shown=shown)


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
            kept = {k: v for k, v in saved.items() if k in known}
            if kept:  # runs saved before --optimizer/--schedule existed trained with AdamW and a cosine
                kept = {"optimizer": "adamw", "schedule": "cosine", **kept}
            return kept
    return {}


def own_options(args: Any, cls: type, key: str, info: dict[str, Any], resume: bool) -> Any:
    """A stage's own options (`cls`, recorded in run.json under `key`): field defaults < (with --resume)
    the options the run was started with < --config YAML < flags; validated."""
    opts = merge_options(args, cls, info.get(key, {}) if resume else None)
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def stage_options(
    args: Any, defaults: Defaults | dict[str, Any] | Callable[[TrainConfig], dict[str, Any]]
) -> TrainConfig:
    """TrainConfig: field defaults < the stage's defaults < (with --resume) the options the run was
    started with < --config YAML < flags. `Defaults` take the learning rate of the run trained (the
    parent; the run itself on --resume); a function of the options given may choose otherwise.
    Checks --data and --out."""
    given: TrainConfig = merge_options(args, TrainConfig)
    if isinstance(defaults, Defaults):
        layer = defaults.for_run(given.out if given.resume else getattr(args, "parent", None))
    else:
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
    fresh_out(out)
    if Path(parent).resolve() == out.resolve():
        raise ConfigError("--out must differ from --from (the parent run is never overwritten)")
    return load_run(parent)


def fresh_out(out: str | Path) -> None:
    """A new run (no --resume) never writes over a training run."""
    if (Path(out) / STATE).exists():
        raise ConfigError(f"{out} already holds a training run; use --resume to continue it or another --out")


def stage_info(stage: str, cfg: TrainConfig, run: Run, args: Any, **extra: Any) -> dict[str, Any]:
    """What run.json records of a stage: its parent (kept across --resume), preset, data, tokenizer and
    seed, plus the stage's own options in `extra`."""
    parent = run.info.get("parent") if cfg.resume else (str(args.parent) if getattr(args, "parent", None) else None)
    if hasattr(args, "conversation_defaults"):  # a stage that reads conversations records how
        extra = {"conversations": vars(conversation_options(args, run, cfg.resume)), **extra}
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
    eval_data: list[str] | None = None,
    loss_fn: LossFn = lm_loss,
    checkpoint: RunCheckpoint | None = None,
) -> tuple[Trainer, TrainResult]:
    """Fit with the engine. With held-out files: val_loss and val_bpb before and after (and every
    --eval-every steps), measured as `minimind eval --task ppl` measures them (minimind/heldout.py)."""
    held = HeldOut.read(eval_data, run.tokenizer, cfg.max_seq_len) if eval_data else None
    measured: dict[int, dict[str, float]] = {}  # by step: the end of training measures once

    def validate() -> dict[str, float]:
        assert held is not None
        if trainer.step not in measured:
            scores = held.score(trainer.model)
            measured[trainer.step] = {"val_loss": scores.loss, "val_bpb": scores.bpb}
        return measured[trainer.step]

    def report() -> str:
        m = validate()
        return f"{m['val_loss']:.4f} (bpb {m['val_bpb']:.4f})"

    trainer = Trainer(
        cfg, run.model.train(), run.tokenizer, rows, info, loss_fn, checkpoint, validate=validate if held else None
    )
    return trainer, fit_and_report(trainer, report if held else None, label="held-out loss")


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


# ---- rows of conversations (SFT, LoRA, reasoning, distillation) ---------------------------------


@dataclass
class ConversationOptions:
    packing: bool = opt(True, "several conversations per row; false pads one per row, as upstream does")
    empty_think_ratio: float = opt(
        0.0, "share of conversations whose replies without reasoning get an empty <think> block (upstream: 0.2)"
    )
    show_mask: int = opt(
        0, "print the first N conversations with the trained tokens marked [[like this]], then exit", metavar="N"
    )

    def validate(self) -> None:
        if not 0 <= self.empty_think_ratio <= 1:
            raise ConfigError("--empty-think-ratio must be between 0 and 1")


def add_conversation_arguments(p: Any, defaults: dict[str, Any] | None = None) -> None:
    """The conversation flags, with the stage's own `defaults` (none differ from the fields' yet)."""
    add_options(p, ConversationOptions, "conversations", shown=defaults)
    p.set_defaults(conversation_defaults=defaults or {})


def conversation_options(args: Any, run: Run, resume: bool) -> ConversationOptions:
    """Field defaults < the stage's < YAML < flags. On --resume give the same flags again: a run whose
    data would differ (another --empty-think-ratio) is refused by the engine's data check."""
    opts = merge_options(args, ConversationOptions, args.conversation_defaults)
    opts.validate()
    return opts


def conversation_rows(args: Any, cfg: TrainConfig, run: Run, held_out: bool = True) -> tuple[ChatRows, ChatRows | None]:
    """Training rows (and, with `held_out`, rows of --eval-data) of conversations; prints what was read
    and packed."""
    tok = run.tokenizer
    opts = conversation_options(args, run, cfg.resume)
    data = tokenize_conversations(
        args.data, tok, cfg.max_seq_len, cfg.cache_dir or None, cfg.skip_bad_lines, opts.empty_think_ratio
    )
    print(f"data: {data.report()} ({'reused cache' if data.reused else 'tokenized'})")
    for message in data.skipped[:5]:
        print(f"  skipped {message}", file=sys.stderr)
    packing = opts.packing
    rows = ChatRows(data, cfg.max_seq_len, packing, tok.pad_id)
    print(
        f"rows: {len(rows):,} of {cfg.max_seq_len} tokens, {rows.fill:.1%} filled "
        f"({'packed' if packing else 'one conversation per row'})"
    )
    eval_rows = None
    if args.eval_data and held_out:
        held = tokenize_conversations(args.eval_data, tok, cfg.max_seq_len, cfg.cache_dir or None)
        eval_rows = ChatRows(held, cfg.max_seq_len, True, tok.pad_id)
    return rows, eval_rows


def show_masks(args: Any, defaults: dict[str, Any]) -> None:
    """--show-mask N: inspect only (no --out needed; nothing is written but the token cache)."""
    cfg = merge_options(args, TrainConfig, defaults)
    if not args.data or not (args.parent or cfg.out):
        raise ConfigError("--show-mask needs --data and --from RUN_DIR (for its tokenizer)")
    print_masks(args, cfg, Tokenizer.load(args.parent or cfg.out))


def print_masks(args: Any, cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    ratio = merge_options(args, ConversationOptions, args.conversation_defaults).empty_think_ratio
    data = tokenize_conversations(args.data, tokenizer, cfg.max_seq_len, cfg.cache_dir or None, empty_think=ratio)
    for i in range(min(args.show_mask, len(data))):
        ids, trained = data.conversation(i)
        print(f"--- conversation {i + 1}: {len(ids)} tokens, {int(trained.sum())} trained [[marked]]")
        print(show_mask(tokenizer, ids, trained, color=sys.stdout.isatty()))


# ---- rows of preference pairs (DPO, the reward model) -------------------------------------------


def pair_rows(paths: list[str], tok: Tokenizer, cfg: TrainConfig, shifted: bool, name: str = "data") -> PairRows:
    """Rows of the pairs in `paths`, after printing what was read (DPO cuts replies, RM drops)."""
    data = read_preferences(paths, tok, cfg.max_seq_len + shifted, shifted, cfg.skip_bad_lines, cfg.cache_dir or None)
    print(f"{name}: {data.report()}")
    for message in data.skipped[:5]:
        print(f"  skipped {message}", file=sys.stderr)
    return PairRows(data, cfg.max_seq_len, tok.pad_id, shifted)


@torch.no_grad()
def per_pair(
    value: Callable[[nn.Module, PairBatch], torch.Tensor],
    model: nn.Module,
    rows: PairRows,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> torch.Tensor:
    """(rows, 2): value(model, batch) of each pair's chosen and rejected side, with `model` in eval mode
    and the engine's autocast (DPO: reference log-probs; reward model: scores)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows.batch(np.arange(start, min(len(rows), start + batch_size))).to(device)
        with autocast(device, dtype):
            v = value(model, batch)
        B = batch.pairs
        out.append(torch.stack([v[:B], v[B:]], 1).float().cpu())
    model.train(was_training)
    return torch.cat(out)
