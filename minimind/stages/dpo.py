"""DPO: direct preference optimisation (Rafailov et al. 2023), preferences learned without a reward model.

data:    preference pairs (minimind/data/preference.py): one prompt, a chosen and a rejected final reply
models:  the policy, starting from --from; a frozen reference (that same run, or --ref) in eval mode,
         no grad, under the same autocast. --precompute-ref computes the reference log-probs of every
         pair once before training, so only the policy is in memory while it trains (same losses).
loss:    log-probs summed over the final reply and its <|im_end|> (--length-norm, and always for ipo:
         divided by its length, the mean token log-prob, as IPO's paper and TRL define it),
             h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
             sigmoid: L = -log sigma(beta h)        ipo: L = (h - 1 / (2 beta))^2
         chosen and rejected in one forward pass (2B rows); the engine averages over pairs.
         --nll-weight W adds W * (-log pi(y_w) / |y_w|) (RPO): DPO alone also lowers the likelihood of
         the chosen replies; this keeps them likely.
metrics: reward margin beta h, reward accuracy (share of pairs with h > 0), chosen/rejected log-probs;
         on --eval-data, also the share of pairs whose chosen reply the policy itself finds likelier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from minimind.data.batch import IGNORE
from minimind.data.preference import FORMS, PairBatch, PairRows
from minimind.engine import Trainer
from minimind.errors import ConfigError
from minimind.losses import dpo_loss, sequence_logprobs
from minimind.options import add_options, opt
from minimind.stages.common import (
    DPO,
    add_stage_arguments,
    fit_and_report,
    own_options,
    pair_rows,
    per_pair,
    reference_model,
    stage_info,
    stage_options,
    start_from,
)


@dataclass
class DPOOptions:
    """Options of the DPO loss; recorded in run.json so that --resume continues with the same ones."""

    beta: float = opt(0.1, "pull toward the reference (smaller lets it drift more)")
    loss: str = opt("sigmoid", "sigmoid (DPO) or ipo (Azar et al. 2023; always on mean token log-probs)",
                    choices=["sigmoid", "ipo"])  # fmt: skip
    ref: str = opt("", "the frozen reference model (default: the --from run)", metavar="RUN_DIR")
    precompute_ref: bool = opt(False, "reference log-probs once, before training: one model in memory")
    length_norm: bool = opt(False, "average the reply's token log-probs instead of summing them")
    nll_weight: float = opt(
        0.0, "add W x the chosen reply's mean token NLL (RPO, Pang et al. 2024): keeps chosen replies likely",
        metavar="W",
    )  # fmt: skip


def add_arguments(p: Any) -> None:
    add_stage_arguments(p, f".jsonl files of preference pairs: {FORMS}", defaults=DPO)
    add_options(p, DPOOptions, "DPO")


def length_normalised(kind: str, length_norm: bool) -> bool:
    """Whether reply log-probs are per-token means: with --length-norm, and always for IPO.

    IPO (Azar et al. 2023) regresses h onto 1 / (2 beta), a fixed target on the scale of *one* token's
    log-prob ratio: with sums, h grows with the replies' lengths and the target means something else
    for every pair (TRL's IPO averages over the completion's tokens for the same reason).
    """
    return length_norm or kind == "ipo"


def reply_logps(model: nn.Module, batch: PairBatch, length_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each row's final reply (2B,), MoE balance loss), from one forward pass."""
    out = model(batch.input_ids)
    logp, n = sequence_logprobs(out.logits, batch.labels)
    return (logp / n.clamp(min=1) if length_norm else logp), out.aux_loss


def chosen_nll(chosen_logp: torch.Tensor, batch: PairBatch, length_norm: bool) -> torch.Tensor:
    """Per pair: -log pi(y_w) / |y_w|, the chosen reply's mean token NLL (RPO's extra term)."""
    if length_norm:
        return -chosen_logp
    n = (batch.labels[: batch.pairs] != IGNORE).sum(-1).clamp(min=1)
    return -chosen_logp / n


class DPOLoss:
    """The engine's loss for DPO: (sum over pairs of L, MoE balance loss, metric sums over pairs)."""

    def __init__(
        self, beta: float, kind: str, length_norm: bool, reference: nn.Module | None = None, nll_weight: float = 0.0
    ):
        if beta <= 0:
            raise ConfigError("--beta must be positive")
        if nll_weight < 0:
            raise ConfigError("--nll-weight must be >= 0")
        self.beta, self.kind, self.reference = beta, kind, reference
        self.length_norm = length_normalised(kind, length_norm)
        self.nll_weight = nll_weight

    def __call__(self, model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        policy, aux = reply_logps(model, batch, self.length_norm)
        ref = batch.ref_logps
        if ref is None:
            if self.reference is None:
                raise ValueError("DPOLoss needs a reference model or precomputed reference log-probs")
            with torch.no_grad():
                ref, _ = reply_logps(self.reference, batch, self.length_norm)
        B = batch.pairs
        loss, chosen_reward, rejected_reward = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.beta, self.kind)
        margin = chosen_reward - rejected_reward
        metrics = {
            "reward_margin": margin.sum(),
            "reward_acc": (margin > 0).float().sum(),
            "logp_chosen": policy[:B].detach().sum(),
            "logp_rejected": policy[B:].detach().sum(),
        }
        if self.nll_weight:
            loss = loss + self.nll_weight * chosen_nll(policy[:B], batch, self.length_norm)
        return loss.sum(), aux, metrics


def pair_logps(
    model: nn.Module, rows: PairRows, length_norm: bool, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(rows, 2): log-probs of each pair's chosen and rejected reply under `model`."""
    return per_pair(lambda m, b: reply_logps(m, b, length_norm)[0], model, rows, device, dtype)


def preference_metrics(policy: torch.Tensor, ref: torch.Tensor, beta: float, kind: str = "sigmoid") -> dict:
    """Means over pairs, from (pairs, 2) policy and reference log-probs (chosen, rejected)."""
    loss, chosen_reward, rejected_reward = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, kind)
    margin = chosen_reward - rejected_reward
    return {
        "loss": float(loss.mean()),
        "reward_margin": float(margin.mean()),
        "reward_acc": float((margin > 0).float().mean()),
        "prefers_chosen": float((policy[:, 0] > policy[:, 1]).float().mean()),
    }


def describe(m: dict) -> str:
    rewards = (
        f"reward accuracy {m['reward_acc']:.0%}, reward margin {m['reward_margin']:.3f}"
        if m["reward_margin"] or m["reward_acc"]
        else "rewards all 0 (policy = reference)"
    )
    return f"DPO loss {m['loss']:.4f}, {rewards}, chosen likelier than rejected {m['prefers_chosen']:.0%}"


def prepare(args: Any) -> tuple[Trainer, PairRows | None, DPOLoss]:
    """Everything `minimind dpo` trains with: the engine (policy, rows, loss) and held-out rows.

    Reference log-probs of held-out pairs are always computed up front; of training pairs only
    with --precompute-ref, after which the reference model is released.
    """
    cfg = stage_options(args, DPO)
    run = start_from(cfg, args.parent)
    opts: DPOOptions = own_options(args, DPOOptions, "dpo", run.info, cfg.resume)
    ref_dir = opts.ref or (run.info.get("reference") if cfg.resume else None)
    tok = run.tokenizer
    rows = pair_rows(args.data, tok, cfg, shifted=True)
    eval_rows = pair_rows(args.eval_data, tok, cfg, shifted=True, name="held-out") if args.eval_data else None
    precompute = opts.precompute_ref
    # Precomputing from the starting run itself needs no second copy of it.
    reference = run.model if precompute and ref_dir is None else reference_model(run.model, tok, ref_dir)
    live_ref = None if precompute else reference
    loss = DPOLoss(opts.beta, opts.loss, opts.length_norm, live_ref, opts.nll_weight)
    info = stage_info("dpo", cfg, run, args, dpo=asdict(opts))
    info["reference"] = ref_dir or info["parent"]
    trainer = Trainer(cfg, run.model.train(), tok, rows, info, loss)
    reference.to(trainer.device)
    for r in (rows, eval_rows) if precompute else (eval_rows,):
        if r is not None:
            r.ref_logps = pair_logps(reference, r, loss.length_norm, trainer.device, trainer.dtype)
    if precompute:
        print(f"reference log-probs of {len(rows):,} pairs computed once; training holds only the policy")
    return trainer, eval_rows, loss


def evaluate(trainer: Trainer, rows: PairRows, loss: DPOLoss) -> dict:
    """Held-out preference metrics of the trainer's current policy (rows carry reference log-probs)."""
    assert rows.ref_logps is not None
    policy = pair_logps(trainer.model, rows, loss.length_norm, trainer.device, trainer.dtype)
    return preference_metrics(policy, rows.ref_logps, loss.beta, loss.kind)


def main(args: Any) -> None:
    trainer, eval_rows, loss = prepare(args)
    check = (lambda: describe(evaluate(trainer, eval_rows, loss))) if eval_rows is not None else None
    fit_and_report(trainer, check)
