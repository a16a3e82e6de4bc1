"""SPO: single-stream policy optimisation (Xu & Ding 2025): one completion per prompt, a baseline that persists.

data, models, reward, loss: as GRPO (minimind/stages/grpo.py), with G = 1 completion per prompt
baseline: a Beta tracker per prompt (minimind/rl/spo.py): b(x) = its success estimate before this
          visit; after it, the counts are discounted by rho = clip(2^(-D/D_half)) and the reward added.
          D = how far the policy moved since x was last seen: the sum of the per-rollout drift, each the
          mean k3 KL between the policy that sampled a rollout and the policy one rollout later, on that
          rollout's own tokens (one extra forward per rollout)
advantage: A = r - b(x), normalised over the batch
sampling: --prioritize draws prompts with weight sqrt(v(1 - v)) + eps (uncertain prompts first),
          from a generator seeded by (seed, rollout): resume repeats the same draws
state:    tracker, drift, last visits, rollout count: saved in train_state.pt (exact resume)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from minimind.config import _parse_bool
from minimind.data.packing import IGNORE
from minimind.engine import autocast
from minimind.errors import ConfigError
from minimind.losses import k3_kl
from minimind.rl.rollout import RLOptions, RolloutSource, token_logps
from minimind.rl.spo import ValueTracker, spo_advantages
from minimind.stages.common import fit_and_report
from minimind.stages.grpo import FLAGS, add_rl_arguments, prepare_rl

SPO_FLAGS = {k: v for k, v in FLAGS.items() if k != "num_generations"}


class SPOState:
    """Everything SPO keeps across rollouts; the rollout source calls `draw` and `before_rollout`."""

    needs_old_logp = True  # the drift is measured against the log-probs a rollout was sampled with

    def __init__(self, num_prompts: int, prioritize: bool | None):
        self.tracker, self.prioritize, self.given = ValueTracker(), bool(prioritize), prioritize is not None
        self.drift = 0.0  # summed policy drift since the start
        self.seen_at = np.full(num_prompts, np.nan)  # drift when each prompt was last answered
        self.rollouts = 0

    def draw(self, source: RolloutSource) -> np.ndarray | None:
        """Prioritised draw (None: the source's usual shuffled order)."""
        if not self.prioritize:
            return None
        n, t, num = source.prompts_per_step(), source.t, len(source.prompts)
        w = self.tracker.weights(range(num)).double().numpy()
        rng = np.random.default_rng([source.cfg.seed, self.rollouts, 11])
        drawn = rng.choice(num, size=n * t.world, replace=False, p=w / w.sum())
        return drawn[t.rank * n : (t.rank + 1) * n]

    @torch.no_grad()
    def before_rollout(self, source: RolloutSource) -> None:
        """Add the drift of the policy since the previous rollout, measured on that rollout's tokens."""
        t, kls = source.t, []
        for b in source.pending:
            on = b.to(t.device)
            with autocast(t.device, t.dtype):
                now = token_logps(t.model(on.input_ids).logits, on.labels, source.opts.temperature)
            mask = on.labels != IGNORE
            kls.append(k3_kl(now[mask], on.old_logp[mask]).mean())  # k3 estimate of KL(pi_then || pi_now)
        if kls:
            self.drift += float(torch.stack(kls).mean())

    def advantages(self, opts: RLOptions):
        def advantages(rewards: torch.Tensor, each: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
            baseline = self.tracker.values(each)
            since = self.drift - self.seen_at[each]
            self.tracker.update(each, rewards, np.where(np.isnan(since), 0.0, since))
            self.seen_at[each] = self.drift
            self.rollouts += 1
            return spo_advantages(rewards, baseline), {"baseline": float(baseline.mean()), "drift": self.drift}

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
    add_rl_arguments(p, 'prompts .jsonl: {"conversations": [...], "answer": ...}', RLOptions(), SPO_FLAGS)
    p.add_argument("--prioritize", type=_parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="sample prompts by uncertainty sqrt(v(1 - v)) (default off)")  # fmt: skip


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
    return prepare_rl(args, "spo", RLOptions(num_generations=1), lambda opts: state.advantages(opts), state)
