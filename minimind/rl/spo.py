"""SPO, single-stream policy optimisation (Xu & Ding 2025, arXiv:2509.13232): a baseline that persists.

GRPO samples G completions per prompt and uses their mean reward as the baseline; a group whose G
rewards are all equal yields no gradient at all. SPO samples one completion per prompt and takes the
baseline from a tracker that remembers each prompt's success rate across steps:

    tracker:    Beta(alpha, beta) per prompt, mean v(x) = alpha / (alpha + beta), prior alpha0, beta0
    baseline:   b(x) = v(x) read *before* this step's reward is added
    update:     alpha <- rho alpha + r,   beta <- rho beta + (1 - r)
    forgetting: rho = clip(2^(-D / D_half), rho_min, rho_max), D = KL(pi_then || pi_now), pi_then being
                the policy that last answered x: the more the policy moved, the faster old outcomes fade
    advantage:  A = r - b(x), then normalised over the whole batch: (A - mean_B) / (std_B + eps)
    curriculum: sample prompt x with weight sqrt(v(1 - v)) + eps: the uncertain ones (v near 1/2) teach most

The defaults D_half = 0.06, rho_min = 0.875, rho_max = 0.96 are the paper's as we recall them (its
text could not be checked here). Measuring D is the caller's job: e.g. the sum of the per-step
`approx_kl` of `policy_loss` since x was last seen. kl=None means D = 0 (rho = rho_max).

For rewards in [0, 1] the update is the Beta posterior with discounted pseudo-counts; for any other
reward range v is still exactly the rho-discounted average of the rewards seen (plus the prior), so
the tracker doubles as a KL-adaptive EMA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Ids = Sequence[int] | torch.Tensor


def _ints(ids: Ids) -> list[int]:
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


class ValueTracker:
    """Per-prompt success-rate tracker with KL-adaptive forgetting. Prompt ids are ints (data set indices).

    A new prompt starts from the prior Beta(prior * strength, (1 - prior) * strength); the default
    Beta(1, 1) is uniform. Pseudo-counts are float64 Python floats, so a state_dict() round trip
    through float64 tensors is exact and resume continues bit for bit.
    """

    def __init__(
        self,
        prior: float = 0.5,
        prior_strength: float = 2.0,
        d_half: float = 0.06,
        rho_min: float = 0.875,
        rho_max: float = 0.96,
    ) -> None:
        if prior_strength <= 0 or d_half <= 0 or not 0 < rho_min <= rho_max <= 1:
            raise ValueError("need prior_strength > 0, d_half > 0 and 0 < rho_min <= rho_max <= 1")
        self.prior, self.prior_strength = float(prior), float(prior_strength)
        self.d_half, self.rho_min, self.rho_max = float(d_half), float(rho_min), float(rho_max)
        self.counts: dict[int, list[float]] = {}  # prompt id -> [alpha, beta]

    def __len__(self) -> int:
        return len(self.counts)

    def discount(self, kl: float) -> float:
        """rho = clip(2^(-D / D_half), rho_min, rho_max): the weight old observations keep."""
        return min(max(2.0 ** (-max(kl, 0.0) / self.d_half), self.rho_min), self.rho_max)

    def _get(self, i: int) -> list[float]:
        return self.counts.get(i) or [self.prior * self.prior_strength, (1 - self.prior) * self.prior_strength]

    def values(self, ids: Ids) -> torch.Tensor:
        """v(x) = alpha / (alpha + beta) for each id (the prior's mean for a prompt never seen), float32."""
        return torch.tensor([a / (a + b) for a, b in map(self._get, _ints(ids))], dtype=torch.float32)

    def update(
        self,
        ids: Ids,
        rewards: torch.Tensor | Sequence[float],
        kl: float | torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        """Discount each prompt's counts once by rho(D), then add its rewards: alpha += r, beta += 1 - r.

        kl: None (D = 0), one float for all rows, or one value per row; a prompt that appears in several
        rows is discounted once, with the D of its first row, and then gets every row's reward.
        """
        ids = _ints(ids)
        rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1).tolist()
        if kl is None or isinstance(kl, (int, float)):
            kls = [float(kl or 0.0)] * len(ids)
        else:
            kls = torch.as_tensor(kl, dtype=torch.float64).reshape(-1).tolist()
        if not len(ids) == len(rewards) == len(kls):
            raise ValueError(f"{len(ids)} ids, {len(rewards)} rewards and {len(kls)} KL values: need one each")
        discounted = set()
        for i, r, d in zip(ids, rewards, kls):
            a, b = self._get(i)
            if i not in discounted:
                rho = self.discount(d)
                a, b = rho * a, rho * b
                discounted.add(i)
            self.counts[i] = [a + r, b + 1 - r]

    def weights(self, ids: Ids, eps: float = 0.05) -> torch.Tensor:
        """Prioritised-sampling weights sqrt(v (1 - v)) + eps (v clipped to [0, 1]); highest at v = 1/2.

        Normalise them (torch.multinomial does) to draw the next prompts; eps keeps every prompt possible.
        """
        v = self.values(ids).double().clamp(0, 1)
        return (torch.sqrt(v * (1 - v)) + eps).float()

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and floats (torch.load(weights_only=True) reads them back)."""
        ab = torch.tensor(list(self.counts.values()), dtype=torch.float64).reshape(-1, 2)
        return {
            "ids": torch.tensor(list(self.counts), dtype=torch.int64),
            "alpha": ab[:, 0].clone(),
            "beta": ab[:, 1].clone(),
            "prior": self.prior,
            "prior_strength": self.prior_strength,
            "d_half": self.d_half,
            "rho_min": self.rho_min,
            "rho_max": self.rho_max,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("prior", "prior_strength", "d_half", "rho_min", "rho_max"):
            setattr(self, k, float(state[k]))
        ids, alpha, beta = state["ids"].tolist(), state["alpha"].tolist(), state["beta"].tolist()
        self.counts = {int(i): [a, b] for i, a, b in zip(ids, alpha, beta)}


def spo_advantages(rewards: torch.Tensor, baselines: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = r - b(x), normalised over the batch: (A - mean_B(A)) / (std_B(A) + eps), float32, (B,).

    std is Bessel-corrected; a batch of one row (no spread to measure) gets A = 0.
    """
    a = rewards.detach().float() - baselines.detach().float().to(rewards.device)
    if a.numel() < 2:
        return torch.zeros_like(a)
    return (a - a.mean()) / (a.std() + eps)
