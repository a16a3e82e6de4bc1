"""Reward model: learn a scalar score r(x, y) that ranks the chosen reply above the rejected one.

data:    preference pairs, as for DPO (minimind/data/preference.py); a pair must fit whole, since the
         score is read at the final reply's closing <|im_end|>
model:   the parent run (--from) plus a linear head on the last token's hidden state
         (minimind/reward_model.py); every weight is trained
loss:    Bradley–Terry, L = -log sigma(r(x, y_w) - r(x, y_l)), averaged over pairs; chosen and rejected
         in one forward pass
metrics: pairwise accuracy (share of pairs with r_w > r_l) and margin r_w - r_l, on training steps and
         on a held-out split (--eval-data FILE, or --heldout FRACTION of --data; 0.1 by default)
saves:   a run directory the RL stages load with `--reward rm:RUN_DIR` (load_reward_model, score)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minimind.checkpoint import Run
from minimind.data.preference import FORMS, PairBatch, PairRows
from minimind.engine import Trainer
from minimind.errors import ConfigError
from minimind.losses import bradley_terry_loss
from minimind.options import add_options, opt
from minimind.reward_model import RewardModel, load_reward_model
from minimind.stages.common import (
    DPO,
    add_stage_arguments,
    fit_and_report,
    pair_rows,
    per_pair,
    run_info,
    stage_info,
    stage_options,
    start_from,
)

# Upstream trains no reward model (its RL stages score with an external InternLM2 reward model), so
# these are ours: tiny measured on the demo data (docs/preference.md), the rest the usual full fine-tuning scale.
REWARD = DPO.but(lrs={"tiny": 1e-3, "tiny-moe": 1e-3}, default_lr=1e-5)
HELDOUT = 0.1


@dataclass
class RewardOptions:
    heldout: float | None = opt(
        None, f"hold out this share of --data for the pairwise accuracy (None: {HELDOUT} without --eval-data, "
        "else 0; --resume keeps the run's)", metavar="FRACTION",
    )  # fmt: skip


def add_arguments(p: Any) -> None:
    add_stage_arguments(p, f".jsonl files of preference pairs: {FORMS}", defaults=REWARD)
    add_options(p, RewardOptions, "reward model")


def reward_loss(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The engine's loss: (sum over pairs of the Bradley–Terry loss, MoE balance loss, metric sums)."""
    scores, aux = model(batch.input_ids, lengths=batch.lengths)
    B = batch.pairs
    chosen, rejected = scores[:B], scores[B:]
    margin = (chosen - rejected).detach()
    metrics = {"accuracy": (margin > 0).float().sum(), "margin": margin.sum()}
    return bradley_terry_loss(chosen, rejected).sum(), aux, metrics


def pair_scores(trainer: Trainer, rows: PairRows) -> torch.Tensor:
    """(rows, 2): rewards of each pair's chosen and rejected conversation."""
    value = lambda m, b: m(b.input_ids, lengths=b.lengths)[0]
    return per_pair(value, trainer.model, rows, trainer.device, trainer.dtype)


def ranking(scores: torch.Tensor) -> dict:
    """Pairwise accuracy, mean margin and Bradley–Terry loss of (pairs, 2) scores (chosen, rejected)."""
    margin = scores[:, 0] - scores[:, 1]
    return {
        "accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "loss": float(bradley_terry_loss(scores[:, 0], scores[:, 1]).mean()),
        "pairs": len(scores),
    }


def describe(m: dict) -> str:
    return (
        f"pairwise accuracy {m['accuracy']:.0%} on {m['pairs']} pairs, margin {m['margin']:.3f}, "
        f"Bradley-Terry loss {m['loss']:.4f}"
    )


def prepare(args: Any) -> tuple[Trainer, PairRows | None]:
    """The engine (reward model, rows, loss) and the held-out rows of `minimind reward`."""
    if args.heldout is not None and args.eval_data:
        raise ConfigError("give either --eval-data FILE or --heldout FRACTION, not both")
    if args.heldout is not None and not 0 <= args.heldout < 1:
        raise ConfigError("--heldout must be a fraction in [0, 1)")
    cfg = stage_options(args, REWARD)
    if cfg.resume:  # the engine loads the weights; the split and provenance come from run.json
        model, tok = load_reward_model(cfg.out)
        saved = run_info(cfg.out)
        default_heldout = saved.get("heldout", 0.0)
    else:
        run = start_from(cfg, args.parent)
        torch.manual_seed(cfg.seed)  # the head's initial weights
        model, tok, saved = RewardModel.from_backbone(run.model), run.tokenizer, {}
        default_heldout = 0.0 if args.eval_data else HELDOUT
    heldout = default_heldout if args.heldout is None else args.heldout
    rows = pair_rows(args.data, tok, cfg, shifted=False)
    eval_rows = None
    if args.eval_data:
        eval_rows = pair_rows(args.eval_data, tok, cfg, shifted=False, name="held-out")
    elif heldout > 0:
        rows, eval_rows = rows.split(heldout, cfg.seed)
        print(f"held-out: {len(eval_rows):,} of the pairs ({heldout:.0%}), not trained on")
    head = "reward_head: linear, hidden state of the last token -> 1"
    info = stage_info("reward", cfg, Run(model, tok, saved), args, heldout=heldout, head=head)
    trainer = Trainer(cfg, model.train(), tok, rows, info, reward_loss)
    return trainer, eval_rows


def main(args: Any) -> None:
    trainer, eval_rows = prepare(args)
    check = (lambda: describe(ranking(pair_scores(trainer, eval_rows)))) if eval_rows is not None else None
    fit_and_report(trainer, check)
