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

import numpy as np
import torch

from minimind.errors import ConfigError
from minimind.losses import group_advantages, zero_signal_groups
from minimind.rl.rollout import RLOptions
from minimind.stages.common import fit_and_report
from minimind.stages.rl_common import add_rl_arguments, prepare_rl


def group_relative(opts: RLOptions):
    """GRPO's advantage: each completion against the other completions of its prompt."""
    G = opts.num_generations
    if G < 2:
        raise ConfigError("--num-generations must be at least 2 for GRPO (advantages are relative to the group)")

    def advantages(rewards: torch.Tensor, each: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        adv = group_advantages(rewards, G, scale=opts.loss != "dr_grpo")
        return adv, {"no_signal_groups": zero_signal_groups(rewards, G) / (len(rewards) // G)}

    return advantages


def add_arguments(p: Any) -> None:
    add_rl_arguments(p)


def prepare(args: Any):
    """(the engine set up for `minimind grpo`, its held-out check or None)."""
    return prepare_rl(args, "grpo", RLOptions, group_relative)


def main(args: Any) -> None:
    trainer, check = prepare(args)
    fit_and_report(trainer, check)
