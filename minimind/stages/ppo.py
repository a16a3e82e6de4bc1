"""PPO (Schulman et al. 2017) with a learned critic, as RLHF uses it (Ziegler et al. 2019).

data, reward: as GRPO (minimind/stages/grpo.py); one completion per prompt by default
models:  actor (--from); critic, a value head on our model (--critic RUN_DIR from `minimind reward`,
         else the actor's weights with a fresh head); frozen reference for the KL penalty (--kl > 0)
rollout: sample and score (minimind/rl/rollout.py), then per token
             r_t = -kl (log pi_old(y_t) - log pi_ref(y_t)) + [t = last real token] score
             V_t = critic(prefix through t)      GAE(gamma, lambda) -> A_t, R_t = A_t + V_t
         advantages whitened over the whole rollout's tokens (of every process: the global batch)
loss:    clipped policy loss, token mean (`policy_loss(kind="ppo")`) + vf_coef x clipped value loss
             L_V = 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-value_clip) - R)^2)
         --minibatches slices x --ppo-epochs optimizer steps per rollout; the rest of a rollout is
         skipped once a step's approx-KL exceeds 1.5 x --target-kl (all processes agree)
saved:   the actor as the run directory; the critic as RUN/critic/ (a reward-model run, reusable as
         --critic or `--reward rm:RUN/critic`); both resume exactly
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minimind.checkpoint import WEIGHTS, load_config, load_weights, save_run
from minimind.config import TrainConfig
from minimind.data.batch import IGNORE
from minimind.engine import RunCheckpoint, autocast
from minimind.errors import ConfigError
from minimind.losses import gae, token_rewards, value_loss, whiten
from minimind.options import opt
from minimind.reward_model import RewardModel, load_reward_model, token_values
from minimind.rl.rollout import PolicyLoss, RLOptions, RolloutBatch, RolloutSource, StageHooks
from minimind.stages.common import fit_and_report
from minimind.stages.rl_common import add_rl_arguments, prepare_rl

CRITIC = "critic"


@dataclass
class PPOOptions(RLOptions):
    num_generations: int = opt(1, "completions sampled per prompt")
    loss: str = "ppo"  # no flag: PPO's clipped objective
    beta: float = 0.0  # no flag: PPO puts the KL into the reward (--kl), not into the loss
    critic: str = opt(
        "", "critic to start from: a `minimind reward` run (default: the actor with a fresh value head)",
        metavar="RUN_DIR",
    )  # fmt: skip

    # GAE and the critic
    gamma: float = opt(1.0, "discount of GAE")
    lam: float = opt(0.95, "lambda of GAE")
    value_clip: float = opt(0.2, "clip of the value loss")

    # the KL penalty and the update
    kl: float = opt(0.02, "per-token KL penalty to the reference, in the reward")
    vf_coef: float = opt(0.5, "weight of the value loss")
    minibatches: int = opt(1, "optimizer steps per pass over a rollout (divides --accumulation)")
    target_kl: float = opt(0.0, "skip the rest of a rollout once a step's approx-KL exceeds 1.5x this (0: off)")

    def uses_reference(self) -> bool:
        return self.kl > 0  # the per-token KL penalty in the reward


class ActorCritic(nn.Module):
    """The two trained models as one module: one optimizer, one DDP wrapper, one forward."""

    def __init__(self, actor: nn.Module, critic: RewardModel):
        super().__init__()
        self.actor, self.critic = actor, critic

    @property
    def cfg(self) -> Any:
        return self.actor.cfg

    @property
    def grad_checkpointing(self) -> bool:
        return self.actor.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        self.actor.grad_checkpointing = self.critic.grad_checkpointing = on

    def num_params(self) -> int:
        return self.actor.num_params() + self.critic.num_params()

    def estimate_mfu(self, *args: Any) -> float:
        return self.actor.estimate_mfu(*args)

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.actor(input_ids)
        v = token_values(self.critic, input_ids)
        out.values, out.aux_loss = v.values, out.aux_loss + v.aux_loss
        return out


class PPOLoss(PolicyLoss):
    """policy_loss(kind="ppo") + vf_coef * value_loss, both token sums (the engine divides by tokens)."""

    def terms(self, out: Any, batch: RolloutBatch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        o = self.opts
        loss, units, stats = super().terms(out, batch)
        vl, vf_clip = value_loss(out.values, batch.old_values, batch.returns, batch.labels != IGNORE, o.value_clip)
        stats.update(value_loss=vl.detach() / units.clamp(min=1), vf_clip=vf_clip)  # units: a device tensor
        return loss + o.vf_coef * vl, units, stats


class PPOState(StageHooks):
    """What the rollout source asks of PPO: values, token rewards and GAE after sampling; early stop."""

    needs_old_logp = True  # the KL penalty reads the sampling policy's log-probs

    def __init__(self) -> None:
        self.loss: PPOLoss | None = None
        self.stopped = 0  # rollouts cut short by --target-kl

    @torch.no_grad()
    def finish(self, source: RolloutSource, batches: list[RolloutBatch], scores: torch.Tensor) -> dict[str, float]:
        t, o = source.rt, source.opts
        critic = t.model.critic  # the actor-critic pair trained
        advs, masks, start, kl_pen, values = [], [], 0, [], []
        for b in batches:
            n = b.input_ids.shape[0]
            on = b.to(t.device)
            mask = on.labels != IGNORE
            with autocast(t.device, t.dtype):
                v = token_values(critic, on.input_ids).values.float() * mask
            ref = on.ref_logp if on.ref_logp is not None else on.old_logp
            r = token_rewards(scores[start : start + n].to(t.device), on.old_logp, ref, mask, o.kl)
            a, ret = gae(r, v, mask, o.gamma, o.lam)
            b.old_values, b.returns = v.cpu(), ret.cpu()
            advs.append(a.cpu())
            masks.append(mask.cpu())
            kl_pen.append(((on.old_logp - ref) * mask).sum() / mask.sum().clamp(min=1))  # read once, below
            values.append(v.sum() / mask.sum().clamp(min=1))
            start += n
        # Whiten over every token of the rollout (not per micro-batch), on all processes together.
        flat = torch.cat([a[m] for a, m in zip(advs, masks)])
        reduce = sum_over_processes(t.device) if t.world > 1 else None
        white = whiten(flat[None], torch.ones_like(flat)[None], reduce=reduce)[0]
        at = 0
        for b, a, m in zip(batches, advs, masks):
            k = int(m.sum())
            b.advantages = torch.zeros_like(a).masked_scatter(m, white[at : at + k])
            at += k
        kl_to_ref, value = torch.stack([torch.stack(kl_pen).mean(), torch.stack(values).mean()]).tolist()
        return {"kl_to_ref": kl_to_ref, "value": value}

    def stop_early(self, source: RolloutSource) -> bool:
        o = source.opts
        if not o.target_kl or self.loss is None:
            return False
        kl = self.loss.last_kl.detach().float().reshape(1).to(source.rt.device)
        if source.rt.world > 1:
            dist.all_reduce(kl)
            kl /= source.rt.world
        stop = float(kl) > 1.5 * o.target_kl
        self.stopped += stop
        return stop

    def state_dict(self) -> dict[str, Any]:
        return {"last_kl": float(self.loss.last_kl) if self.loss else 0.0, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.loss is not None:
            self.loss.last_kl = torch.tensor(state["last_kl"])
        self.stopped = state["stopped"]


class PPOCheckpoint(RunCheckpoint):
    """The actor as the run directory, the critic beside it in RUN/critic/ (same step metadata)."""

    def save(self, trainer: Any, folder: Path, info: dict[str, Any], metadata: dict[str, str]) -> None:
        critic_info = {"stage": "reward", "role": "PPO critic", "parent": info.get("parent"), "step": info["step"]}
        save_run(folder / CRITIC, trainer.model.critic, trainer.tokenizer, critic_info, weights_metadata=metadata)
        save_run(folder, trainer.model.actor, trainer.tokenizer, info, weights_metadata=metadata)

    def load(self, trainer: Any, folder: Path) -> None:
        load_weights(trainer.model.actor, folder / WEIGHTS)
        load_weights(trainer.model.critic, folder / CRITIC / WEIGHTS)


def sum_over_processes(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An all-reduce (sum) on the training device, for statistics of the global batch."""

    def reduce(v: torch.Tensor) -> torch.Tensor:
        v = v.to(device)
        dist.all_reduce(v)
        return v.cpu()

    return reduce


def make_critic(actor: nn.Module, opts: PPOOptions, cfg: TrainConfig) -> RewardModel:
    if cfg.resume:  # the critic saved beside the run (its weights are loaded with the rest)
        return RewardModel(load_config(f"{cfg.out}/{CRITIC}"))
    if opts.critic:
        critic, tok = load_reward_model(opts.critic)
        if critic.cfg.vocab_size != actor.cfg.vocab_size:
            raise ConfigError(f"--critic {opts.critic}: its vocabulary differs from the actor's")
        return critic.train()
    with torch.random.fork_rng():  # the fresh head depends on --seed only, not on what ran before
        torch.manual_seed(cfg.seed)
        return RewardModel.from_backbone(copy.deepcopy(actor))


def add_arguments(p: Any) -> None:
    add_rl_arguments(p, PPOOptions, skip=("loss", "beta"))


def prepare(args: Any):
    state = PPOState()

    def setup(run: Any, opts: PPOOptions, cfg: TrainConfig) -> tuple[Any, Any, Any]:
        if opts.loss != "ppo":
            raise ConfigError("PPO trains with its clipped loss (--loss ppo)")
        if opts.minibatches < 1 or opts.gamma < 0 or not 0 <= opts.lam <= 1 or opts.kl < 0:
            raise ConfigError("need --minibatches >= 1, --gamma >= 0, 0 <= --lam <= 1, --kl >= 0")
        state.loss = PPOLoss(opts)
        return ActorCritic(run.model, make_critic(run.model, opts, cfg)), state.loss, PPOCheckpoint()

    no_advantage = lambda opts: lambda rewards, each: (torch.zeros_like(rewards), {})  # GAE sets them
    return prepare_rl(args, "ppo", PPOOptions, no_advantage, state, setup)


def main(args: Any) -> None:
    trainer, check = prepare(args)
    fit_and_report(trainer, check)
