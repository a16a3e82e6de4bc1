"""Reasoning distillation: SFT on traces `<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>`, tags weighted.

data:  SFT conversations whose assistant replies are reasoning traces (upstream's r1_mix_1024.jsonl),
       tokenized, masked and packed exactly as `minimind sft` does
model: the parent run (--from)
loss:  weighted cross-entropy over the assistant tokens (the SFT mask),
           L = sum_t w_t CE_t / sum_t w_t,   w_t = tag_weight if y_t is one of the four tag tokens else 1
       The tags are single special tokens of our tokenizer, so exactly the tag positions of the replies
       are weighted: a `<think>` the user typed is not trained at all, and no sub-word piece such as
       `<` or `th` is weighted anywhere (upstream weights every occurrence of those pieces).
check: with --eval-data, held-out loss and the share of greedy replies that follow the format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from minimind.checkpoint import Run
from minimind.data.batch import IGNORE, Batch
from minimind.data.chat import ChatRows, ChatTokens
from minimind.engine import Trainer, evaluate_loss
from minimind.errors import ConfigError, DataError
from minimind.losses import weighted_token_cross_entropy_sum
from minimind.options import add_options, opt
from minimind.stages.common import (
    SFT,
    add_conversation_arguments,
    add_stage_arguments,
    conversation_rows,
    fit_and_report,
    own_options,
    show_masks,
    stage_info,
    stage_options,
    start_from,
)
from minimind.tokenizer import TAGS as SPECIAL_TAGS
from minimind.tokenizer import Tokenizer

TAGS = tuple(SPECIAL_TAGS[:4])  # <think> </think> <answer> </answer>
# Upstream (train_distill_reason.py): 1 epoch, rows of 1024 tokens (its data is r1_mix_1024). The
# learning rate follows SFT's table (docs/sft.md).
REASON = SFT.but(options={**SFT.options, "epochs": 1, "max_seq_len": 1024})
HELD_OUT_PROMPTS = 64  # greedy replies generated for the format check


@dataclass
class ReasonOptions:
    """Recorded in run.json so that --resume continues with the same ones."""

    tag_weight: float = opt(10.0, "loss weight of the four tag tokens (1: like any other token)", metavar="W")
    format_tokens: int = opt(256, "reply length for the held-out format check", metavar="N")

    def validate(self) -> None:
        if self.tag_weight <= 0:
            raise ConfigError("--tag-weight must be positive (1 trains the tags like any other token)")


def add_arguments(p: Any) -> None:
    add_stage_arguments(
        p, ".jsonl conversations whose replies are <think>…</think><answer>…</answer> traces", defaults=REASON
    )
    add_conversation_arguments(p)
    add_options(p, ReasonOptions, "reasoning")


def tag_sequences(tok: Tokenizer) -> list[list[int]]:
    """The ids of each tag: one special token in our tokenizers; in a tokenizer without them (upstream
    MiniMind2's) the tag's own few pieces, which are then weighted only where they spell the whole tag."""
    return [[tok.tag_ids[t]] if t in tok.tag_ids else tok.encode(t) for t in TAGS]


def tag_positions(labels: torch.Tensor, tags: list[list[int]]) -> torch.Tensor:
    """(B, T) bool: labels that are a tag token, or part of a whole multi-token tag."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    for seq in tags:
        k = len(seq)
        if k > labels.shape[1]:
            continue
        windows = labels.unfold(1, k, 1)  # (B, T - k + 1, k)
        starts = (windows == torch.tensor(seq, dtype=labels.dtype)).all(-1)
        for j in range(k):
            out[:, j : j + starts.shape[1]] |= starts
    return out


@dataclass
class WeightedBatch(Batch):
    weights: torch.Tensor | None = None  # (B, T) loss weight per label, 0 where IGNORE

    @property
    def loss_units(self) -> float:
        assert self.weights is not None
        return float(self.weights.sum())

    def to(self, device: torch.device) -> WeightedBatch:
        b = super().to(device)
        assert self.weights is not None
        return WeightedBatch(b.input_ids, b.labels, b.segment_ids, self.weights.to(device, non_blocking=True))


class TagWeightedRows:
    """SFT rows whose labels carry weights: tag_weight on the tag tokens, 1 on other trained tokens."""

    def __init__(self, rows: ChatRows, tags: list[list[int]], tag_weight: float):
        self.rows, self.tags, self.tag_weight = rows, tags, tag_weight

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: np.ndarray) -> WeightedBatch:
        b = self.rows.batch(rows)
        trained = b.labels != IGNORE
        w = torch.where(tag_positions(b.labels, self.tags), self.tag_weight, 1.0) * trained
        return WeightedBatch(b.input_ids, b.labels, b.segment_ids, w)


def weighted_loss(model: nn.Module, batch: WeightedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's loss: (sum_t w_t CE_t, MoE balance loss); the engine divides by sum_t w_t."""
    assert batch.weights is not None
    out = model(batch.input_ids, segment_ids=batch.segment_ids)
    return weighted_token_cross_entropy_sum(out.logits, batch.labels, batch.weights), out.aux_loss


def count_tags(data: ChatTokens, tags: list[list[int]]) -> int:
    """Tag tokens (or whole multi-token tags' pieces) among the trained tokens of the data."""
    labels = torch.from_numpy(np.where(np.asarray(data.trained), np.asarray(data.tokens, dtype=np.int64), IGNORE))
    return int(tag_positions(labels[None], tags).sum())


def main(args: Any) -> None:
    if args.show_mask:  # the SFT mask; the tags among the marked tokens are the weighted ones
        return show_masks(args, REASON.options)
    trainer, check = prepare(args)
    fit_and_report(trainer, check)


def prepare(args: Any) -> tuple[Trainer, Callable[[], str] | None]:
    """The engine set up for `minimind reason` (weighted rows and loss), and the held-out check."""
    cfg = stage_options(args, REASON)
    run = start_from(cfg, args.parent)
    opts: ReasonOptions = own_options(args, ReasonOptions, "reason", run.info, cfg.resume)
    tags = tag_sequences(run.tokenizer)
    chat_rows, eval_rows = conversation_rows(args, cfg, run)
    n_tags = count_tags(chat_rows.data, tags)
    if n_tags == 0:
        raise DataError(f"{args.data[0]}: no {'/'.join(TAGS)} tags in any assistant reply (reasoning traces expected)")
    single = all(len(t) == 1 for t in tags)
    print(
        f"tags: {n_tags:,} tag tokens in the replies, weighted x{opts.tag_weight:g}"
        + ("" if single else " (this tokenizer spells the tags in pieces: whole tags are weighted)")
    )
    info = stage_info("reason", cfg, run, args, reason=asdict(opts))
    rows = TagWeightedRows(chat_rows, tags, opts.tag_weight)
    trainer = Trainer(cfg, run.model.train(), run.tokenizer, rows, info, weighted_loss)
    check = None
    if eval_rows is not None:
        check = lambda: held_out(trainer, eval_rows, args.eval_data[0], opts.format_tokens)
    return trainer, check


def held_out(trainer: Trainer, rows: ChatRows, path: str, max_new_tokens: int) -> str:
    """Held-out loss (nats per assistant token, unweighted) and the format share of greedy replies."""
    from minimind.eval import evaluate

    loss = evaluate_loss(trainer.model, rows)
    run = Run(trainer.model, trainer.tokenizer, {"stage": "reason"})
    report = evaluate(run, "format", path, limit=HELD_OUT_PROMPTS, max_new_tokens=max_new_tokens)
    trainer.model.train()
    return f"loss {loss:.4f}, replies in <think>/<answer> format {report['score']:.0%} of {report['n']}"
