"""What the RL stages (GRPO, PPO, SPO) share: their defaults, flags and options, and `prepare_rl`,
which sets up the engine for one: prompts, reward, reference model and the rollout source
(minimind/rl/rollout.py). A stage passes what is its own: its options' defaults, its advantage rule,
its state beside the rollout (SPO's tracker, PPO's critic) and its model setup.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from minimind.config import TrainConfig
from minimind.data.prompts import encode_prompt, read_prompts
from minimind.engine import Trainer
from minimind.errors import ConfigError, DataError
from minimind.losses import group_advantages, zero_signal_groups
from minimind.options import add_options
from minimind.rl.rewards import parse_reward
from minimind.rl.rollout import (
    PolicyLoss,
    RLOptions,
    RolloutSource,
    StageHooks,
    describe_rewards,
    held_out_rewards,
    policy_of,
)
from minimind.stages.common import (
    DPO,
    add_stage_arguments,
    own_options,
    reference_model,
    stage_info,
    stage_options,
    start_from,
)

# Default learning rate by preset: DPO's table (the same values measured as moving a policy without
# wrecking it; upstream's GRPO uses 8e-8). docs/rl.md has the table.
# batch_size = prompts per micro-batch (each sampled G times); accumulation micro-batches per rollout.
RL = DPO.but(options={"batch_size": 4, "accumulation": 1, "epochs": 1, "weight_decay": 0.0, "max_seq_len": 1024})
PROMPTS = 'prompts .jsonl: {"conversations": [...], "answer": ...}'


def add_rl_arguments(p: Any, cls: type[RLOptions] = RLOptions, skip: tuple[str, ...] = (), data: str = PROMPTS) -> None:
    """Every RL stage's flags: the engine's and those of its options (`cls`, but `skip`)."""
    add_stage_arguments(p, data, defaults=RL)
    add_options(p, cls, "reinforcement learning", skip)


def policy_setup(run: Any, opts: RLOptions, cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(model to train, loss, checkpoint) of the GRPO family: the policy alone, PolicyLoss, a run."""
    if opts.loss not in ("grpo", "dr_grpo", "cispo"):
        raise ConfigError(f"--loss {opts.loss!r}: one of grpo, dr_grpo, cispo")
    return run.model, PolicyLoss(opts), None


def group_relative(opts: RLOptions):
    """GRPO's advantage: each completion against the other completions of its prompt."""
    G = opts.num_generations
    if G < 2:
        raise ConfigError("--num-generations must be at least 2 for GRPO (advantages are relative to the group)")

    def advantages(rewards: torch.Tensor, each: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        adv = group_advantages(rewards, G, scale=opts.loss != "dr_grpo")
        return adv, {"no_signal_groups": zero_signal_groups(rewards, G) / (len(rewards) // G)}

    return advantages


def prepare_rl(
    args: Any,
    stage: str,
    cls: type[RLOptions],
    advantages: Any,
    hooks: StageHooks | None = None,
    setup: Any = policy_setup,
    source: type[RolloutSource] = RolloutSource,
    held_out: Any = held_out_rewards,
):
    """The engine set up for an RL stage: options, prompts, reward, reference, rollout source.
    `setup(run, opts, cfg)` gives the model to train, its loss and checkpoint (PPO: actor + critic);
    `source` samples the rollouts (the agent: episodes), `held_out` is the held-out check."""
    cfg: TrainConfig = stage_options(args, RL)
    run = start_from(cfg, args.parent)
    opts = own_options(args, cls, "rl", run.info, cfg.resume)
    model, loss, checkpoint = setup(run, opts, cfg)
    tok = run.tokenizer
    prompts = read_prompts(args.data, cfg.skip_bad_lines)
    reward = parse_reward(opts.reward)  # checked now; RolloutSource binds it to the trainer's device
    reward.check(prompts)
    room = min(cfg.max_seq_len, run.cfg.max_position_embeddings) - opts.max_new_tokens
    ids = [encode_prompt(tok, p, opts.think) for p in prompts]
    keep = [i for i, x in enumerate(ids) if len(x) <= room]
    if not keep:
        raise DataError(f"{args.data[0]}: no prompt fits in {room} tokens (max_seq_len - max_new_tokens)")
    dropped = len(prompts) - len(keep)
    prompts, ids = [prompts[i] for i in keep], [ids[i] for i in keep]
    print(f"data: {len(prompts):,} prompts" + (f", {dropped:,} longer than {room} tokens dropped" if dropped else ""))
    held = read_prompts(args.eval_data) if args.eval_data else None
    ref_dir = opts.ref or (run.info.get("reference") if cfg.resume else None)
    info = stage_info(stage, cfg, run, args, rl=vars(opts))
    info["reference"] = ref_dir or info["parent"]
    reference = reference_model(run.model, tok, ref_dir) if opts.uses_reference() else None
    make = lambda rt: source(rt, prompts, ids, reward, opts, advantages(opts), reference, hooks)
    trainer = Trainer(cfg, model.train(), tok, None, info, loss, checkpoint, source=make)
    check = None
    if held is not None:
        reward.check(held)

        def check() -> str:
            m = held_out(policy_of(trainer.sampling_model()), tok, held, reward, opts, opts.eval_samples)
            return describe_rewards(m, opts, len(held))

    return trainer, check
