"""GRPO: group relative policy optimisation (Shao et al. 2024), with the Dr.GRPO and CISPO variants.

data:    prompts in SFT form, the final assistant turn a placeholder (minimind/data/prompts.py); an
         optional "answer" per prompt for rule rewards
models:  the policy (--from); a frozen reference (that run, or --ref) when beta > 0
rollout: G completions per prompt at temperature T (minimind/rl/rollout.py), scored by --reward
advantage: per group of G,  A_i = (r_i - mean_G r) / (std_G r + eps)    (dr_grpo: no std division)
loss:    per token, rho = pi / pi_old (exactly 1 on the first step of a rollout),
             grpo / dr_grpo: -min(rho A, clip(rho, 1 - clip, 1 + clip_high) A) + beta k3(pi, pi_ref)
             cispo:          -sg(clip(rho)) A log pi + beta k3
         grpo averages each completion over its tokens; dr_grpo divides by max_new_tokens instead;
         cispo averages over all tokens (minimind/losses.py `policy_loss` has the formulas).
metrics: reward mean/std (and each term), groups with no signal (all rewards equal), KL to the
         reference, entropy, clip fraction, ratio, response length, rollout tokens/s, share of time
         in generation.
"""

from __future__ import annotations

from typing import Any

from minimind.rl.rollout import RLOptions
from minimind.stages.common import fit_and_report
from minimind.stages.rl_common import add_rl_arguments, group_relative, prepare_rl


def add_arguments(p: Any) -> None:
    add_rl_arguments(p)


def prepare(args: Any):
    """(the engine set up for `minimind grpo`, its held-out check or None)."""
    return prepare_rl(args, "grpo", RLOptions, group_relative)


def main(args: Any) -> None:
    trainer, check = prepare(args)
    fit_and_report(trainer, check)
