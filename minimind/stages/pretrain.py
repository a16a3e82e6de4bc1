"""Pretraining: next-token prediction on packed documents.

data:  text files -> cached token stream -> rows of max_seq_len tokens (no padding)
model: a fresh preset (or the run being resumed)
loss:  -sum_t log p(x_t | x_<t) / tokens  (+ MoE balance loss)
optimizer: the full-size presets default to Muon on a WSD schedule (common.PRETRAIN), tiny to AdamW
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from minimind.checkpoint import Run, load_config, new_model
from minimind.config import PRESETS, ModelConfig, TrainConfig, preset_of
from minimind.data.packing import PackedRows
from minimind.data.tokens import tokenize_files
from minimind.errors import ConfigError
from minimind.model import MiniMind
from minimind.options import add_options, given
from minimind.stages.common import PRETRAIN, add_stage_arguments, fresh_out, run_info, stage_info, stage_options, train
from minimind.tokenizer import Tokenizer


def add_arguments(p: Any) -> None:
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory or tokenizer.json")
    p.add_argument("--preset", choices=list(PRESETS), help="model shape (not needed with --resume)")
    add_stage_arguments(p, '.jsonl ({"text": ...} per line) or .txt files', parent=False)
    skip = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings")
    add_options(p, ModelConfig, "model overrides (new runs)", skip)


def options(args: Any) -> TrainConfig:
    """Field defaults < the preset's (common.PRETRAIN) < the run's own on --resume < YAML < flags."""
    return stage_options(args, lambda given: dict(PRETRAIN.get(args.preset or "", {})))


def main(args: Any) -> None:
    cfg = options(args)
    out = Path(cfg.out)
    if cfg.resume:
        tokenizer = Tokenizer.load(out)
        model = MiniMind(load_config(out))
    else:
        if not args.tokenizer or not args.preset:
            raise ConfigError("--tokenizer and --preset are required for a new run (or --resume an existing one)")
        fresh_out(out)
        tokenizer = Tokenizer.load(args.tokenizer)
        # max_position_embeddings is skipped as a flag: the table must cover --max-seq-len.
        overrides = given(args, ModelConfig)
        model = new_model(args.preset, tokenizer, cfg.seed, cfg.max_seq_len, **overrides)
    if cfg.max_seq_len > model.cfg.max_position_embeddings:
        raise ConfigError(
            f"max_seq_len {cfg.max_seq_len} exceeds the model's max_position_embeddings "
            f"({model.cfg.max_position_embeddings})"
        )
    tokens = tokenize_files(args.data, tokenizer, cfg.cache_dir or None, cfg.skip_bad_lines)
    print(
        f"data: {tokens.num_documents:,} documents, {len(tokens.tokens):,} tokens "
        f"({'reused cache' if tokens.reused else 'tokenized'} {tokens.path.name})"
    )
    for message in tokens.skipped[:5]:
        print(f"  skipped {message}", file=sys.stderr)
    if tokens.skipped:
        print(f"  skipped {tokens.skipped.count:,} bad lines in all (--skip-bad-lines)", file=sys.stderr)
    rows = PackedRows(tokens.tokens, tokens.offsets, cfg.max_seq_len, cfg.doc_mask)
    run = Run(model, tokenizer, run_info(out) if cfg.resume else {})
    info = stage_info("pretrain", cfg, run, args, preset=args.preset or run.info.get("preset") or preset_of(model.cfg))
    train(cfg, run, rows, info, args.eval_data)
