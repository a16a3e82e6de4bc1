"""Supervised fine-tuning: teach a pretrained model to answer in turns.

data:  {"conversations": [{"role", "content"}, ...]} per line, rendered as ChatML, with tools, tool
       calls and results, reasoning (minimind/data/messages.py); with --empty-think-ratio R (upstream:
       0.2) a share R of replies without reasoning get an empty <think> block, so the model also
       answers when thinking is switched off
       -> rows packing whole conversations, attention kept inside each (no compute on padding)
model: the parent run (--from)
loss:  -sum_{t in assistant replies} log p(x_t | x_<t) / (assistant tokens)
       every assistant reply (its thinking, text and tool calls) and its closing <|im_end|> is learned;
       system, user, tool results and headers are not.
"""

from __future__ import annotations

from typing import Any

from minimind.stages.common import (
    SFT,
    add_conversation_arguments,
    add_stage_arguments,
    conversation_rows,
    show_masks,
    stage_info,
    stage_options,
    start_from,
    train,
)


def add_arguments(p: Any) -> None:
    add_stage_arguments(p, '.jsonl files of {"conversations": [{"role": ..., "content": ...}, ...]}', defaults=SFT)
    add_conversation_arguments(p)


def main(args: Any) -> None:
    if args.show_mask:
        return show_masks(args, SFT.options)
    cfg = stage_options(args, SFT)
    run = start_from(cfg, args.parent)
    rows, _ = conversation_rows(args, cfg, run, held_out=False)
    train(cfg, run, rows, stage_info("sft", cfg, run, args), args.eval_data)
