"""LoRA: fine-tune a frozen run through small low-rank adapters (the math is in minimind/lora.py).

data:  SFT conversations, the same rows as `minimind sft`
model: the parent run, frozen; A and B on every --target layer are the only trained weights
loss:  the SFT loss (assistant tokens only)
saves: adapter.safetensors + adapter.json (+ train_state.pt) in --out (default RUN_DIR/lora/NAME);
       the base run is never written, so several named adapters can share one base.

`minimind lora merge RUN_DIR --lora DIR --out RUN_DIR` folds an adapter into full weights.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from minimind.checkpoint import WEIGHTS, load_run, save_run
from minimind.config import TrainConfig, preset_of
from minimind.engine import RunCheckpoint, Trainer
from minimind.errors import ConfigError
from minimind.lora import (
    ADAPTER_WEIGHTS,
    LoRAConfig,
    inject,
    load_adapter,
    load_adapter_weights,
    merge,
    read_adapter_config,
    save_adapter,
)
from minimind.options import add_options, merge_options
from minimind.stages.common import (
    SFT,
    add_conversation_arguments,
    add_stage_arguments,
    conversation_rows,
    fresh_out,
    stage_info,
    stage_options,
    train,
)

# Upstream's LoRA learning rate is 1e-4 (trainer/train_lora.py); the tiny demo model needs more.
LORA = SFT.but(lrs={"tiny": 2e-3, "tiny-moe": 2e-3}, default_lr=1e-4)


class AdapterCheckpoint(RunCheckpoint):
    """Checkpoints of a LoRA run hold the adapter only; the frozen base stays where it is."""

    weights = ADAPTER_WEIGHTS

    def __init__(self, cfg: LoRAConfig):
        self.cfg = cfg

    def save(self, trainer: Trainer, folder: Path, info: dict[str, Any], metadata: dict[str, str]) -> None:
        save_adapter(trainer.model, folder, self.cfg, info, metadata)

    def load(self, trainer: Trainer, folder: Path) -> None:
        load_adapter_weights(trainer.model, folder)


def add_arguments(p: Any) -> None:
    p.add_argument("action", nargs="?", choices=["train", "merge"], default="train", help="train (default) or merge")
    p.add_argument("run", nargs="?", metavar="RUN_DIR", help="merge: the base run")
    p.add_argument("--lora", metavar="DIR", help="merge: the adapter to fold into RUN_DIR")
    add_stage_arguments(p, '.jsonl files of {"conversations": [...]} (as for sft)', defaults=LORA)
    add_options(p, LoRAConfig, "adapter")
    add_conversation_arguments(p)


def merge_main(args: Any) -> None:
    if not args.run or not args.lora or not args.out:
        raise ConfigError("usage: minimind lora merge RUN_DIR --lora ADAPTER_DIR --out NEW_RUN_DIR")
    if Path(args.out).resolve() == Path(args.run).resolve() or (Path(args.out) / WEIGHTS).exists():
        raise ConfigError(f"{args.out} already holds a model; merge into a new directory (the base stays as it is)")
    run = load_run(args.run)
    cfg = load_adapter(run.model, args.lora)
    merge(run.model)
    info = {
        "stage": "lora-merged",
        "parent": str(args.run),
        "preset": preset_of(run.cfg),
        "tokenizer": run.tokenizer.source,
        "lora_merged": {"path": str(args.lora), "name": cfg.name, "rank": cfg.rank, "alpha": cfg.alpha},
    }
    save_run(args.out, run.model, run.tokenizer, info)
    print(f"merged adapter {cfg.name!r} (rank {cfg.rank}, alpha {cfg.alpha:g}) into {args.run} -> {args.out}")


def main(args: Any) -> None:
    if args.action == "merge":
        return merge_main(args)
    given = merge_options(args, TrainConfig)
    if not given.out and not args.parent:
        raise ConfigError("--from RUN_DIR is required (the base run), or --out ADAPTER_DIR with --resume")
    lora_cfg: LoRAConfig = merge_options(args, LoRAConfig)
    args.out = given.out or str(Path(args.parent) / "lora" / lora_cfg.name)
    if given.resume:  # the base and the adapter's shape are recorded beside it
        saved, record = read_adapter_config(args.out)
        args.parent = record.get("parent")
        lora_cfg = merge_options(args, LoRAConfig, asdict(saved))
        changed = [k for k, v in asdict(lora_cfg).items() if asdict(saved)[k] != v]
        if changed:
            raise ConfigError(f"--resume continues the adapter as it was made: {', '.join(changed)} cannot change")
    lora_cfg.validate()
    if not args.parent:
        raise ConfigError("--from RUN_DIR is required (the base run the adapter is trained on)")
    cfg = stage_options(args, lambda given: LORA.for_run(args.parent))  # the base's shape, also on --resume
    if Path(cfg.out).resolve() == Path(args.parent).resolve():
        raise ConfigError("--out must differ from --from (the base run is never written)")
    if not cfg.resume:
        fresh_out(cfg.out)
    run = load_run(args.parent)
    torch.manual_seed(cfg.seed)  # the adapter's A matrices start from the seed
    wrapped = inject(run.model, lora_cfg)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    print(
        f"LoRA {lora_cfg.name!r}: rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g} on {len(wrapped)} layers; "
        f"{trainable:,} trained parameters ({trainable / run.model.num_params():.2%} of the base)"
    )
    rows, _ = conversation_rows(args, cfg, run, held_out=False)
    info = stage_info("lora", cfg, run, args, parent=str(args.parent), name=lora_cfg.name)
    train(cfg, run, rows, info, args.eval_data, checkpoint=AdapterCheckpoint(lora_cfg))
