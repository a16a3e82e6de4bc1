"""Rollouts: what every RL stage shares between sampling completions and the engine's optimizer steps.

One rollout feeds `ppo_epochs` optimizer steps:

    prompts (each process its slice of a seeded global draw, as the engine draws rows)
    -> G completions per prompt from the shared sampling engine (batched, KV cache, positions from the
       padding mask), sampled at temperature T from the *full* distribution: no top-k / top-p, so the
       training side recomputes exactly the distribution that was sampled from (softmax(logits / T));
       each completion from its own keyed random stream, so the world size does not change the draw
    -> rewards (`--reward SPEC`) -> advantages (the stage's rule: group-relative, tracked baseline, ...)
    -> micro-batches of right-padded prompt + completion rows; labels are the completion tokens up to
       and including the first EOS; reference log-probs once (when beta > 0); the policy's own
       log-probs once when ppo_epochs > 1 (with one epoch the loss uses the live ones, detached)
    -> `ppo_epochs` optimizer steps over those micro-batches (the importance ratio is exactly 1 on the
       first, and moves after it).

Right padding needs no attention mask under causal attention, so the training forward is the plain
one; rollout log-probs (left-padded, KV-cached) equal it to float tolerance (tested). The source's
state (prompt sampler, unfinished rollout, the stage's own state such as SPO baselines) goes into
train_state.pt, so `--resume` continues exactly, even between two epochs of one rollout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from minimind.data.batch import IGNORE, Batch, Sampler
from minimind.data.prompts import Prompt, encode_prompt, reply_prefix
from minimind.engine import autocast
from minimind.errors import ConfigError
from minimind.generate import SamplingParams, generate, row_key
from minimind.losses import entropy_from_logits, policy_loss, token_logps
from minimind.options import opt
from minimind.rl.episodes import Episode
from minimind.rl.rewards import RewardFn, Rewards
from minimind.sources import BatchSource, Runtime
from minimind.tokenizer import Tokenizer


@dataclass
class RLOptions:
    """What every RL stage takes beyond the engine's TrainConfig (recorded in run.json for --resume)."""

    reward: str = opt("", "reward spec, e.g. rule:math, rule:math+0.2*rule:format, rm:RUN_DIR, hf:PATH",
                      metavar="SPEC")  # fmt: skip
    num_generations: int = opt(8, "completions sampled per prompt (G)")
    max_new_tokens: int = opt(256, "longest completion")
    temperature: float = opt(1.0, "sampling temperature (full distribution: no top-k/top-p in RL)")

    # the loss
    beta: float = opt(0.02, "weight of the k3 KL to the reference (0: no reference model)")
    clip: float = opt(0.2, "ratio clip epsilon")
    clip_high: float = opt(0.0, "upper clip epsilon (DAPO's clip-higher; 0: same as --clip)")
    loss: str = opt("grpo", "grpo | dr_grpo | cispo")
    ppo_epochs: int = opt(1, "optimizer steps on each rollout")

    # the reference, the prompt, the held-out check
    ref: str = opt("", "the frozen reference model (default: the --from run)", metavar="RUN_DIR")
    think: bool | None = opt(None, "open a <think> block in the generation prompt", negate="--no-think")
    eval_tokens: int = opt(0, "reply length of the held-out check (0: --max-new-tokens)")
    eval_samples: int = opt(4, "replies sampled per held-out prompt (as in training) besides the greedy one")

    def budget(self) -> int:
        """The most tokens of a completion that carry a loss (Dr.GRPO's fixed denominator)."""
        return self.max_new_tokens

    def uses_reference(self) -> bool:
        """Whether the stage needs the frozen reference model (the GRPO family: for the KL in the loss)."""
        return self.beta > 0

    def validate(self) -> None:
        if not self.reward:
            raise ConfigError("--reward SPEC is required (e.g. rule:math, rule:math+0.2*rule:format, rm:RUN_DIR)")
        if self.num_generations < 1 or self.max_new_tokens < 1 or self.ppo_epochs < 1:
            raise ConfigError("--num-generations, --max-new-tokens and --ppo-epochs must be at least 1")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0: RL samples (greedy replies would all be the same)")
        if self.beta < 0 or self.clip <= 0 or self.clip_high < 0:
            raise ConfigError("--beta must be >= 0 and --clip > 0")


@dataclass
class RolloutBatch(Batch):
    """Right-padded prompt + completion rows; labels are completion tokens (IGNORE elsewhere)."""

    advantages: torch.Tensor | None = None  # (B,) per completion, or (B, T) per token
    old_logp: torch.Tensor | None = None  # (B, T) log-probs of the sampling policy, if ppo_epochs > 1
    ref_logp: torch.Tensor | None = None  # (B, T) reference log-probs, if beta > 0
    per_sequence: bool = True  # the loss averages per completion (grpo, dr_grpo) or per token
    old_values: torch.Tensor | None = None  # (B, T) critic values at rollout time (PPO)
    returns: torch.Tensor | None = None  # (B, T) GAE returns (PPO)

    @property
    def loss_units(self) -> float:
        return self.input_ids.shape[0] if self.per_sequence else self.num_tokens

    def tensors(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device) -> RolloutBatch:
        move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return RolloutBatch(**{k: move(v) for k, v in self.tensors().items()})


def completion_rows(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    max_positions: int | None = None,
    trained: list[list[bool]] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels) of prompt + completion rows, right-padded to a multiple of 8 (friendlier
    shapes for the kernels), but never past `max_positions`, the model's RoPE table: a padded column
    there would index beyond it (a device-side assert on CUDA) even though it carries no loss.
    `trained` (per completion token) leaves the others unlabelled: an agent's tool results."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    longest = max(len(s) - 1 for s in seqs)
    T = -(-longest // 8) * 8
    if max_positions is not None:
        if longest > max_positions:
            raise ValueError(f"a prompt + completion of {longest + 1} tokens exceeds {max_positions} positions")
        T = min(T, max_positions)
    inputs = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for j, (p, s) in enumerate(zip(prompts, seqs)):
        inputs[j, : len(s) - 1] = torch.tensor(s[:-1])
        target = torch.tensor(s[len(p) :], dtype=torch.long)
        if trained is not None and len(target):
            target = torch.where(torch.tensor(trained[j], dtype=torch.bool), target, IGNORE)
        labels[j, len(p) - 1 : len(s) - 1] = target
    return inputs, labels


class PolicyLoss:
    """The engine's loss for the RL stages: `minimind.losses.policy_loss` on the completion tokens,
    with clip fraction, ratio, approx-KL, KL to the reference and entropy logged per unit."""

    def __init__(self, opts: RLOptions):
        self.opts = opts
        self.last_kl = torch.zeros(())  # approx-KL of the latest micro-batch (PPO's early stop reads it)

    def __call__(self, model: nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(batch.input_ids)
        loss, units, stats = self.terms(out, batch)
        return loss, out.aux_loss, {k: v.detach() * units for k, v in stats.items()}

    def terms(self, out: Any, batch: RolloutBatch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """(loss sum, units, stats) from the forward output (a stage may add its own terms: PPO)."""
        o = self.opts
        mask = batch.labels != IGNORE
        logp = token_logps(out.logits, batch.labels, o.temperature)
        old = batch.old_logp if batch.old_logp is not None else logp.detach()
        loss, units, stats = policy_loss(
            logp, old, batch.advantages, mask, o.loss, o.clip, o.clip_high or None, batch.ref_logp, o.beta,
            max_len=o.budget(),
        )  # fmt: skip
        with torch.no_grad():
            stats["entropy"] = entropy_from_logits(out.logits.detach() / o.temperature, mask)
        self.last_kl = stats["approx_kl"].detach()
        return loss, units, stats


def policy_of(model: nn.Module) -> nn.Module:
    """The language model that samples (PPO trains an actor-critic pair; the actor samples)."""
    return getattr(model, "actor", model)


# An advantage rule: (rewards (N,) of the rollout, prompt index of each completion (N,)) ->
# (advantages (N,), metrics to log). GRPO: group-relative; SPO: a tracked per-prompt baseline.
AdvantageFn = Callable[[torch.Tensor, np.ndarray], tuple[torch.Tensor, dict[str, float]]]


class StageHooks:
    """What an RL stage may plug into its rollouts (SPO's tracker, PPO's critic); each hook is a no-op
    here, and its state goes into the resume file with the source's."""

    needs_old_logp = False  # the rollout keeps the sampling policy's log-probs even at --ppo-epochs 1

    def draw(self, source: RolloutSource) -> np.ndarray | None:
        """This process's prompt indices of the next rollout; None: the source's shuffled order."""
        return None

    def before_rollout(self, source: RolloutSource) -> None:
        pass

    def finish(self, source: RolloutSource, batches: list[RolloutBatch], scores: torch.Tensor) -> dict[str, float]:
        """After the rollout's log-probs: fill in what the stage's loss needs; returns metrics to log."""
        return {}

    def stop_early(self, source: RolloutSource) -> bool:
        """Whether to drop the rest of the current rollout and sample a new one."""
        return False

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RolloutSource(BatchSource):
    """The engine's batch source for RL: each optimizer step's micro-batches, from rollouts."""

    def __init__(
        self,
        rt: Runtime,
        prompts: list[Prompt],
        prompt_ids: list[list[int]],
        reward: RewardFn,
        opts: RLOptions,
        advantages: AdvantageFn,
        reference: nn.Module | None,
        hooks: StageHooks | None = None,
    ):
        self.rt, self.prompts, self.prompt_ids, self.opts = rt, prompts, prompt_ids, opts
        self.reward = reward.to(rt.device)  # reward models score where the policy runs
        self.advantages, self.reference, self.hooks = advantages, reference, hooks or StageHooks()
        self.cfg = rt.cfg
        self.sampler = Sampler(len(prompts), self.cfg.seed)
        self.pending: list[RolloutBatch] = []  # the current rollout's micro-batches
        self.steps_left = 0  # optimizer steps still to take on them
        self.step = 0  # the optimizer step being served (it keys the sampling streams)
        self.prefix = reply_prefix(rt.tokenizer, opts.think)
        self._window: dict[str, list[float]] = {}
        self._window_start = time.perf_counter()
        if reference is not None:
            reference.to(rt.device)

    # ---- the engine's side -----------------------------------------------------------------------

    def prompts_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.accumulation

    def steps_per_epoch(self) -> int:
        per_rollout = self.prompts_per_step() * self.rt.world
        if len(self.prompts) < per_rollout:
            raise ConfigError(
                f"{len(self.prompts)} prompts, fewer than one rollout needs ({per_rollout}); "
                "lower --batch-size/--accumulation or set --max-steps"
            )
        if self.cfg.accumulation % self.minibatches:
            raise ConfigError(f"--accumulation {self.cfg.accumulation} must be a multiple of --minibatches")
        return len(self.prompts) // per_rollout * self.opts.ppo_epochs * self.minibatches

    def describe(self) -> str:
        o = self.opts
        per_rollout = o.ppo_epochs * self.minibatches
        return (
            f"{self.prompts_per_step()}x{self.rt.world} prompts x {o.num_generations} samples of <= {o.max_new_tokens} "
            f"new tokens, {per_rollout} step{'s' if per_rollout > 1 else ''} per rollout ({len(self.prompts)} prompts)"
        )

    @property
    def minibatches(self) -> int:
        return getattr(self.opts, "minibatches", 1)  # PPOOptions has it

    def next_step(self, step: int) -> list[Batch]:
        """This process's micro-batches of the next optimizer step: one of `minibatches` slices of the
        rollout, each used `ppo_epochs` times; a new rollout when they are used up (or when the stage
        stops a rollout early, PPO on approx-KL)."""
        self.step = step
        per_rollout = self.opts.ppo_epochs * self.minibatches
        if self.steps_left and self.hooks.stop_early(self):
            self.steps_left = 0
        if self.steps_left == 0:
            self.pending = self.rollout()
            self.steps_left = per_rollout
        k = (per_rollout - self.steps_left) % self.minibatches
        self.steps_left -= 1
        size = len(self.pending) // self.minibatches
        return self.pending[k * size : (k + 1) * size]

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "steps_left": self.steps_left,
            "pending": [b.tensors() for b in self.pending],  # SPO measures drift on the last rollout
            "stage": self.hooks.state_dict(),
            "world": self.rt.world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resume under another number of processes drops the unfinished rollout (its micro-batches
        were one process's share of another split): the next step samples a fresh one."""
        self.sampler.load_state_dict(state["sampler"])
        same_split = state.get("world", self.rt.world) == self.rt.world
        self.steps_left = state["steps_left"] if same_split else 0
        self.pending = [RolloutBatch(**b) for b in state["pending"]] if same_split else []
        if state.get("stage") is not None:
            self.hooks.load_state_dict(state["stage"])

    def log_metrics(self) -> dict[str, float]:
        """Rollout means since the last log line: rewards, lengths, generation speed and time share."""
        w, self._window = self._window, {}
        now = time.perf_counter()
        elapsed, self._window_start = now - self._window_start, now
        out = {k: float(np.mean(v)) for k, v in w.items() if k not in ("gen_s", "gen_tokens")}
        if w.get("gen_s"):
            out["rollout_tok_s"] = sum(w["gen_tokens"]) / max(sum(w["gen_s"]), 1e-9)
            out["gen_share"] = sum(w["gen_s"]) / max(elapsed, 1e-9)
        return out

    # ---- one rollout -----------------------------------------------------------------------------

    def draw(self) -> np.ndarray:
        """This process's prompt indices of the next global draw (the stage may draw its own: SPO)."""
        drawn = self.hooks.draw(self)
        if drawn is not None:
            return drawn
        n = self.prompts_per_step()
        return self.sampler.take(n * self.rt.world)[self.rt.rank * n : (self.rt.rank + 1) * n]

    def sample(
        self, model: nn.Module, index: np.ndarray, each: np.ndarray
    ) -> tuple[list[list[int]], list[str], list | None]:
        """(completion ids, what the reward judges, which completion ids are trained or None: all) of
        the completions of `each` prompt by `model`. One reply per completion; the agent runs episodes."""
        t, o, tok = self.rt, self.opts, self.rt.tokenizer
        G, B = o.num_generations, self.cfg.batch_size
        params = SamplingParams(
            max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=1.0, top_k=0, stop_ids=tok.stop_ids
        )
        completions: list[list[int]] = []
        # Completion j of process r is completion r * len(each) + j of the step's global draw; its tokens
        # come from its own random stream (a key of seed, step and that index), so 1 process and N
        # processes with the same global batch sample the same completions.
        keys = self.sampling_keys(len(each))
        for start in range(0, len(each), B * G):  # one generate call per micro-batch
            rows = slice(start, start + B * G)
            with autocast(t.device, t.dtype):
                out = generate(model, [self.prompt_ids[i] for i in each[rows]], params, keys=keys[rows])
            completions += [g.tokens for g in out.generations]
        return completions, [self.prefix + tok.decode(c, skip_special_tokens=True) for c in completions], None

    def sampling_keys(self, n: int) -> list[int]:
        return [row_key(self.cfg.seed, self.step, self.rt.rank * n + j) for j in range(n)]

    def rollout(self) -> list[RolloutBatch]:
        t, o, tok = self.rt, self.opts, self.rt.tokenizer
        G, B = o.num_generations, self.cfg.batch_size
        self.hooks.before_rollout(self)
        index = self.draw()
        each = np.repeat(index, G)  # prompt index of every completion
        model = policy_of(t.sampling_model())  # whole on this process, also under FSDP
        max_positions = model.cfg.max_position_embeddings
        model.eval()
        t0 = time.perf_counter()
        completions, texts, trained = self.sample(model, index, each)
        gen_s = time.perf_counter() - t0
        model.train()
        rewards: Rewards = self.reward([self.prompts[i] for i in index], texts)
        adv, metrics = self.advantages(rewards.total, each)
        finished = [
            not x.unfinished if isinstance(x, Episode) else bool(c) and c[-1] in tok.stop_ids
            for x, c in zip(texts, completions)
        ]
        self._record(
            {
                "reward": float(rewards.total.mean()),
                "reward_std": float(rewards.total.std()) if len(texts) > 1 else 0.0,
                **{f"reward[{k}]": float(v.mean()) for k, v in rewards.parts.items() if len(rewards.parts) > 1},
                "length": float(np.mean([len(c) for c in completions])),
                "finished": float(np.mean(finished)),
                **metrics,
                "gen_s": gen_s,
                "gen_tokens": float(sum(len(c) for c in completions)),
            }
        )
        batches = []
        for start in range(0, len(each), B * G):
            stop = start + B * G
            inputs, labels = completion_rows(
                [self.prompt_ids[i] for i in each[start:stop]],
                completions[start:stop],
                tok.pad_id,
                max_positions,
                trained[start:stop] if trained is not None else None,
            )
            batches.append(
                RolloutBatch(inputs, labels, None, adv[start:stop].clone(), per_sequence=o.loss in ("grpo", "dr_grpo"))
            )
        # Log-probs stay on the device that computes them and the optimizer steps read them: a .cpu()
        # per micro-batch would make the host wait for each forward pass in turn.
        with torch.no_grad():
            for b in batches:
                on = b.to(t.device)
                with autocast(t.device, t.dtype):
                    if self.reference is not None:
                        b.ref_logp = token_logps(self.reference(on.input_ids).logits, on.labels, o.temperature)
                    if o.ppo_epochs > 1 or self.hooks.needs_old_logp:
                        b.old_logp = token_logps(t.train_model(on.input_ids).logits, on.labels, o.temperature)
        self._record(self.hooks.finish(self, batches, rewards.total))  # PPO: values, token rewards, GAE
        return batches

    def _record(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._window.setdefault(k, []).append(v)


@torch.no_grad()
def held_out_check(
    model: nn.Module,
    tok: Tokenizer,
    opts: RLOptions,
    measure: Callable[[SamplingParams, int], dict[str, float]],
    samples: int = 0,
) -> dict[str, dict[str, float]]:
    """Held-out check: `measure(params, k)` (k replies per prompt) of greedy replies, and with `samples`
    > 0 of that many replies per prompt sampled as in training (temperature T, full distribution) from a
    fixed seed: the global RNG is left alone, so checks never change training."""
    was_training = model.training
    model.eval()
    n = opts.eval_tokens or opts.max_new_tokens
    try:
        out = {"greedy": measure(SamplingParams(max_new_tokens=n, temperature=0, stop_ids=tok.stop_ids), 1)}
        if samples:
            sampled = SamplingParams(n, opts.temperature, top_p=1.0, top_k=0, stop_ids=tok.stop_ids, seed=0)
            out["sampled"] = measure(sampled, samples)
    finally:
        model.train(was_training)
    return out


def held_out_rewards(
    model: nn.Module,
    tok: Tokenizer,
    prompts: list[Prompt],
    reward: RewardFn,
    opts: RLOptions,
    samples: int = 0,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """`held_out_check` of the mean reward, and each term's mean, of one-turn replies to `prompts`."""
    ids = [encode_prompt(tok, p, opts.think) for p in prompts]
    prefix = reply_prefix(tok, opts.think)

    def mean_rewards(params: SamplingParams, k: int) -> dict[str, float]:
        rows = [x for x in ids for _ in range(k)]
        texts = []
        for start in range(0, len(rows), batch_size):
            out = generate(model, rows[start : start + batch_size], params)
            texts += [prefix + tok.decode(g.tokens, skip_special_tokens=True) for g in out.generations]
        r = reward(prompts, texts)
        return {"reward": float(r.total.mean()), **{k: float(v.mean()) for k, v in r.parts.items()}}

    return held_out_check(model, tok, opts, mean_rewards, samples)


def describe_rewards(m: dict[str, dict[str, float]], opts: RLOptions, n: int) -> str:
    def one(r: dict[str, float]) -> str:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "reward")
        return f"{r['reward']:.3f}" + (f" ({parts})" if len(r) > 2 else "")

    text = f"mean reward of greedy replies {one(m['greedy'])}"
    if "sampled" in m:
        text += f"; of sampled replies (T={opts.temperature:g}) {one(m['sampled'])}"
    return text + f" on {n} prompts"
