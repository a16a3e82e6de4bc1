"""Supervised fine-tuning: teach a pretrained model to answer in turns.

data:  {"conversations": [{"role", "content"}, ...]} per line, rendered as ChatML
       -> rows packing whole conversations, attention kept inside each (no compute on padding)
model: the parent run (--from)
loss:  -sum_{t in assistant replies} log p(x_t | x_<t) / (assistant tokens)
       every assistant reply and its closing <|im_end|> is learned; system, user and headers are not.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from minimind.checkpoint import CONFIG, Run, load_config
from minimind.config import TrainConfig, _parse_bool, merge_options, preset_of
from minimind.data.chat import ChatRows, show_mask, tokenize_conversations
from minimind.errors import ConfigError
from minimind.stages.common import add_stage_arguments, stage_info, stage_options, start_from, train
from minimind.tokenizer import Tokenizer

# Default SFT learning rate by preset. Upstream uses 5e-7 (MiniMind2, trainer/train_full_sft.py at
# 0323815) and 1e-5 (minimind-3); on our demo data 5e-7 leaves a model where it was, so ours are
# higher. README.md has the table.
SFT_LR = {
    "tiny": 2e-3,
    "tiny-moe": 2e-3,
    "minimind2-small": 2e-5,
    "minimind2": 1e-5,
    "minimind2-moe": 1e-5,
    "minimind3": 1e-5,
    "minimind3-moe": 1e-5,
}
DEFAULT_LR = 1e-5
SFT_DEFAULTS = {"batch_size": 16, "accumulation": 1, "epochs": 2, "weight_decay": 0.0}


def add_arguments(p: Any) -> None:
    add_stage_arguments(p, '.jsonl files of {"conversations": [{"role": ..., "content": ...}, ...]}')
    add_conversation_arguments(p)


def add_conversation_arguments(p: Any) -> None:
    p.add_argument(
        "--packing",
        type=_parse_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="several conversations per row (default true); false pads one per row, as upstream does",
    )
    p.add_argument(
        "--show-mask",
        type=int,
        default=0,
        metavar="N",
        help="print the first N conversations with the trained tokens marked [[like this]], then exit",
    )


def stage_defaults(parent: str | None, out: str, resume: bool, lrs: dict[str, float], default_lr: float) -> dict:
    """Defaults that depend on the model: the learning rate for the parent's preset (by shape)."""
    run_dir = out if resume else parent
    if not run_dir or not (Path(run_dir) / CONFIG).is_file():
        return {"lr": default_lr}
    return {"lr": lrs.get(preset_of(load_config(run_dir)) or "", default_lr)}


def conversation_rows(args: Any, cfg: TrainConfig, run: Run) -> tuple[ChatRows, ChatRows | None]:
    """Training rows (and held-out rows) of conversations; prints what was read and packed."""
    tok = run.tokenizer
    data = tokenize_conversations(args.data, tok, cfg.max_seq_len, cfg.cache_dir or None, cfg.skip_bad_lines)
    print(f"data: {data.report()} ({'reused cache' if data.reused else 'tokenized'})")
    for message in data.skipped[:5]:
        print(f"  skipped {message}", file=sys.stderr)
    rows = ChatRows(data, cfg.max_seq_len, args.packing, tok.pad_id)
    print(
        f"rows: {len(rows):,} of {cfg.max_seq_len} tokens, {rows.fill:.1%} filled "
        f"({'packed' if args.packing else 'one conversation per row'})"
    )
    eval_rows = None
    if args.eval_data:
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
    data = tokenize_conversations(args.data, tokenizer, cfg.max_seq_len, cfg.cache_dir or None)
    for i in range(min(args.show_mask, len(data))):
        ids, trained = data.conversation(i)
        print(f"--- conversation {i + 1}: {len(ids)} tokens, {int(trained.sum())} trained [[marked]]")
        print(show_mask(tokenizer, ids, trained, color=sys.stdout.isatty()))


def main(args: Any) -> None:
    if args.show_mask:
        return show_masks(args, SFT_DEFAULTS)
    cfg = stage_options(
        args, lambda given: {**SFT_DEFAULTS, **stage_defaults(args.parent, given.out, given.resume, SFT_LR, DEFAULT_LR)}
    )
    run = start_from(cfg, args.parent)
    rows, eval_rows = conversation_rows(args, cfg, run)
    train(cfg, run, rows, stage_info("sft", cfg, run, args), eval_rows)
