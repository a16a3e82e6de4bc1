"""SPO: single-stream policy optimisation (Xu & Ding 2025): one completion per prompt, a baseline that persists.

data, models, reward, loss: as GRPO (minimind/stages/grpo.py), with G = 1 completion per prompt
baseline: a Beta tracker per prompt (minimind/rl/spo.py): b(x) = its success estimate before this
          visit; after it, the counts are discounted by rho = clip(2^(-D/D_half)) and the reward added.
          D = how far the policy moved since x was last seen: the sum of the per-rollout drift, each the
          mean k3 estimate of KL(pi_then || pi_now) on the tokens pi_then sampled in a rollout, pi_now
          being the policy one rollout later (one extra forward per rollout)
advantage: A = r - b(x), normalised over the (global) batch
processes: under DDP every process gathers all rewards of a rollout before the tracker is updated, so
          every process holds the same tracker, draws the same prompts and normalises over the same
          batch: N processes train exactly as one process with the same global batch
sampling: --prioritize draws prompts with weight sqrt(v(1 - v)) + eps (uncertain prompts first),
          from a generator seeded by (seed, rollout): resume repeats the same draws
state:    tracker, drift, last visits, rollout count: saved in train_state.pt (exact resume)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from minimind.data.batch import IGNORE
from minimind.engine import autocast
from minimind.errors import ConfigError
from minimind.losses import k3_kl, token_logps
from minimind.options import opt
from minimind.rl.rollout import RLOptions, RolloutSource, StageHooks
from minimind.rl.spo import ValueTracker, spo_advantages
from minimind.stages.common import fit_and_report
from minimind.stages.rl_common import add_rl_arguments, prepare_rl


@dataclass
class SPOOptions(RLOptions):
    num_generations: int = 1  # no flag: one completion per prompt
    prioritize: bool | None = opt(None, "sample prompts by uncertainty sqrt(v(1 - v)) (None: off)")


class SPOState(StageHooks):
    """Everything SPO keeps across rollouts; the rollout source calls `draw` and `before_rollout`."""

    needs_old_logp = True  # the drift is measured against the log-probs a rollout was sampled with

    def __init__(self, num_prompts: int, prioritize: bool | None):
        self.tracker, self.prioritize, self.given = ValueTracker(), bool(prioritize), prioritize is not None
        self.drift = 0.0  # summed policy drift since the start
        self.seen_at = np.full(num_prompts, np.nan)  # drift when each prompt was last answered
        self.rollouts = 0
        self.device, self.rank, self.world = torch.device("cpu"), 0, 1  # set by the source (before_rollout)

    def draw(self, source: RolloutSource) -> np.ndarray | None:
        """Prioritised draw (None: the source's usual shuffled order)."""
        if not self.prioritize:
            return None
        n, t, num = source.prompts_per_step(), source.rt, len(source.prompts)
        w = self.tracker.weights(range(num)).double().numpy()
        rng = np.random.default_rng([source.cfg.seed, self.rollouts, 11])
        drawn = rng.choice(num, size=n * t.world, replace=False, p=w / w.sum())
        return drawn[t.rank * n : (t.rank + 1) * n]

    @torch.no_grad()
    def before_rollout(self, source: RolloutSource) -> None:
        """Add the drift of the policy since the previous rollout, measured on that rollout's tokens."""
        t, kls = source.rt, []
        self.device, self.rank, self.world = t.device, t.rank, t.world
        for b in source.pending:
            on = b.to(t.device)
            with autocast(t.device, t.dtype):
                now = token_logps(t.model(on.input_ids).logits, on.labels, source.opts.temperature)
            mask = on.labels != IGNORE
            # The tokens were sampled from pi_then, so k3 with pi_then as the sampling policy estimates
            # KL(pi_then || pi_now): k3_kl(sampling log-probs, other log-probs).
            kls.append(k3_kl(on.old_logp[mask], now[mask]).mean())
        if kls:
            drift = torch.stack(kls).mean().double()
            if self.world > 1:  # the mean over processes: every tracker discounts by the same D
                dist.all_reduce(drift)
                drift /= self.world
            self.drift += float(drift)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (n,) of this process -> the (world * n,) of all processes, in rank order (the global draw's)."""
        if self.world == 1:
            return x
        x = x.to(self.device)
        out = torch.empty(self.world * x.numel(), dtype=x.dtype, device=self.device)
        dist.all_gather_into_tensor(out, x)
        return out.cpu()

    def advantages(self, opts: RLOptions):
        def advantages(rewards: torch.Tensor, each: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
            n = len(each)
            every = self.gather(torch.as_tensor(each, dtype=torch.int64)).numpy()  # the whole global draw
            rewards_all = self.gather(rewards.float())
            baseline = self.tracker.values(every)
            since = self.drift - self.seen_at[every]
            self.tracker.update(every, rewards_all, np.where(np.isnan(since), 0.0, since))
            self.seen_at[every] = self.drift
            self.rollouts += 1
            adv = spo_advantages(rewards_all, baseline)[self.rank * n : (self.rank + 1) * n]
            return adv, {"baseline": float(baseline.mean()), "drift": self.drift}

        return advantages

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "drift": self.drift,
            "seen_at": torch.from_numpy(self.seen_at.copy()),
            "rollouts": self.rollouts,
            "prioritize": self.prioritize,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.drift, self.rollouts = state["drift"], state["rollouts"]
        self.seen_at = state["seen_at"].numpy().copy()
        if not self.given:  # --resume keeps the sampling the run started with
            self.prioritize = state["prioritize"]


def add_arguments(p: Any) -> None:
    add_rl_arguments(p, SPOOptions, skip=("num_generations",))


def main(args: Any) -> None:
    trainer, check = prepare(args)
    fit_and_report(trainer, check)


def prepare(args: Any):
    from minimind.data.prompts import read_prompts

    if getattr(args, "num_generations", 1) not in (None, 1):
        raise ConfigError("SPO samples one completion per prompt (--num-generations 1)")
    args.num_generations = 1
    num_prompts = len(read_prompts(args.data, skip_bad_lines=True))  # an upper bound of the prompts kept
    state = SPOState(num_prompts, args.prioritize)
    return prepare_rl(args, "spo", SPOOptions, lambda opts: state.advantages(opts), state)
