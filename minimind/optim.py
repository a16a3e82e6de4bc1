"""The optimizers and the learning-rate schedules of the training loop.

`--optimizer adamw`: AdamW on everything (weight decay on matrices only).
`--optimizer muon`: Muon on the hidden matrices (every 2-D weight inside a transformer block), AdamW on
the rest (embeddings, the head, norms), as Muon's authors use it. Muon replaces a matrix's momentum by
the nearest semi-orthogonal matrix (all singular values ~1), so every direction of the update moves at
the same rate (Jordan et al. 2024, "Muon"; Liu et al. 2025, "Muon is scalable", Moonlight):

    B <- mu B + (1 - mu) G                                   (momentum, mu = 0.95)
    U = (1 - mu) G + mu B                                     (Nesterov)
    O = NewtonSchulz5(U) ~ U (U^T U)^(-1/2)
    W <- W (1 - lr wd) - lr * 0.2 sqrt(max(m, n)) * O         (m x n weight)

The 0.2 sqrt(max(m, n)) factor gives the update the RMS of a typical AdamW update (Moonlight), so one
--lr and --weight-decay serve both groups.

Schedules (`--schedule`): `cosine` warms up linearly, then follows a cosine to lr * min_lr_ratio;
`wsd` (warmup-stable-decay) warms up, holds lr, and decays linearly to lr * min_lr_ratio over the last
`--decay-share` of the run, so a run can be cut at any budget (`--max-time`) and still end decayed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minimind.config import TrainConfig

# Quintic Newton-Schulz coefficients (Jordan et al.): they drive every singular value of a matrix
# scaled to norm <= 1 into about [0.7, 1.2] within five steps, fast rather than exactly to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def lr_at(
    step: int, total: int, warmup: int, lr: float, min_ratio: float, schedule: str = "cosine", decay: float = 0.2
) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warmup to lr over `warmup`
    steps, then cosine to lr * min_ratio at `total`, or (wsd) constant until the last `decay` share of
    the steps and linear to lr * min_ratio at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "wsd":
        start = max(warmup, total - round(decay * total))
        if step < start:
            return lr
        progress = (step + 1 - start) / max(1, total - start)
        return lr * (1 - (1 - min_ratio) * min(progress, 1.0))
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T of G = U S V^T: X = G / ||G||_F, then `steps` of X <- a X + (b A + c A^2) X with A = X X^T
    (on the wide orientation, so A is the smaller Gram matrix). In float32."""
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), the tensor itself otherwise. In-place ops on it
    change the parameter or state it belongs to."""
    return t.to_local() if hasattr(t, "to_local") else t


def _whole(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole matrix of which `local` is this process's shard (laid out as `like`): one all-gather."""
    if not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def _shard(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of `whole`, laid out as `like` (no communication: a local slice)."""
    if not hasattr(like, "device_mesh"):
        return whole
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, like.placements).to_local()


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon: True`, AdamW for the others (one optimizer, so the engine sets
    one learning rate and saves one state). Skips a step on the device when the engine sets
    `found_inf` (a non-finite gradient): moments, step counts and weights stay as they were."""

    _step_supports_amp_scaling = True  # reads found_inf itself (the engine and GradScaler set it)

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        eps: float = 1e-8,
        ns_steps: int = 5,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, momentum=momentum, eps=eps, ns_steps=ns_steps)
        super().__init__(groups, defaults | {"muon": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        found_inf = getattr(self, "found_inf", None)
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("Muon expects unscaled gradients (call GradScaler.unscale_ first)")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            good = (1 - found_inf.to(params[0].device)) if found_inf is not None else None
            for p in params:
                if group["muon"]:
                    self._muon(p, group, good)
                else:
                    self._adamw(p, group, good)

    def _muon(self, p: torch.Tensor, group: dict[str, Any], good: torch.Tensor | None) -> None:
        mu, lr = group["momentum"], group["lr"]
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        g = _local(p.grad)
        buf = _local(state["momentum_buffer"])
        if good is None:
            buf.lerp_(g, 1 - mu)
        else:
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            buf.lerp_(g, (1 - mu) * good)
        u = g.lerp(buf, mu)
        m, n = p.shape[-2:]
        o = _shard(newton_schulz(_whole(u, p), group["ns_steps"]), p).to(p.dtype)
        scale = lr * 0.2 * math.sqrt(max(m, n))
        w = _local(p)
        if good is None:
            w.mul_(1 - lr * group["weight_decay"]).add_(o, alpha=-scale)
        else:
            w.mul_(1 - lr * group["weight_decay"] * good).sub_(o * (scale * good))

    def _adamw(self, p: torch.Tensor, group: dict[str, Any], good: torch.Tensor | None) -> None:
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        g, m, v, w = _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), _local(p)
        step = state["step"]
        if good is None:
            step += 1
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            t = float(step)  # a host read only without found_inf (the engine always passes it)
            w.mul_(1 - lr * group["weight_decay"])
            w.addcdiv_(m, (v / (1 - b2**t)).sqrt_().add_(eps), value=-lr / (1 - b1**t))
            return
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        step += good
        m.lerp_(g, (1 - b1) * good)
        v.lerp_(g * g, (1 - b2) * good)
        t = step.clamp(min=1)
        w.mul_(1 - lr * group["weight_decay"] * good)
        w.sub_((lr * good / (1 - b1**t)) * m / ((v / (1 - b2**t)).sqrt() + eps))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW: [matrices (decayed), vectors (not)]; Muon adds [hidden matrices] first: the 2-D weights
    inside the transformer blocks (`layers.`), never the embedding, the head (tied or not) or a
    one-row head (a reward or value head)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied weight once
    hidden = [
        p for n, p in named if cfg.optimizer == "muon" and ".layers." in f".{n}" and p.dim() == 2 and min(p.shape) > 1
    ]
    ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in ids]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "muon":
        groups.insert(0, {"params": hidden, "weight_decay": cfg.weight_decay, "muon": True})
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernels where the device has them), or Muon + AdamW (`--optimizer muon`)."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
