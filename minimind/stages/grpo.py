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

from minimind.config import TrainConfig, _parse_bool
from minimind.data.prompts import encode_prompt, read_prompts
from minimind.engine import Trainer
from minimind.errors import ConfigError, DataError
from minimind.losses import group_advantages, zero_signal_groups
from minimind.rl.rewards import parse_reward
from minimind.rl.rollout import (
    PolicyLoss,
    RLOptions,
    RolloutSource,
    describe_rewards,
    held_out_rewards,
    policy_of,
)
from minimind.stages.common import (
    add_stage_arguments,
    fit_and_report,
    reference_model,
    stage_info,
    stage_options,
    start_from,
)
from minimind.stages.dpo import DEFAULT_LR as DPO_DEFAULT_LR
from minimind.stages.dpo import DPO_LR
from minimind.stages.sft import stage_defaults

# Default learning rate by preset: DPO's table (the same values measured as moving a policy without
# wrecking it; upstream's GRPO uses 8e-8). README.md has the table.
RL_LR, DEFAULT_LR = DPO_LR, DPO_DEFAULT_LR
# batch_size = prompts per micro-batch (each sampled G times); accumulation micro-batches per rollout.
RL_DEFAULTS = {"batch_size": 4, "accumulation": 1, "epochs": 1, "weight_decay": 0.0, "max_seq_len": 1024}
FLAGS = {  # RLOptions field -> flag help
    "reward": "reward spec, e.g. rule:math, rule:math+0.2*rule:format, rm:RUN_DIR, hf:PATH",
    "num_generations": "completions sampled per prompt (G)",
    "max_new_tokens": "longest completion",
    "temperature": "sampling temperature (full distribution: no top-k/top-p in RL)",
    "beta": "weight of the k3 KL to the reference (0: no reference model)",
    "clip": "ratio clip epsilon",
    "clip_high": "upper clip epsilon (DAPO's clip-higher; 0: same as --clip)",
    "loss": "grpo | dr_grpo | cispo",
    "ppo_epochs": "optimizer steps on each rollout",
    "eval_tokens": "reply length of the held-out check (0: --max-new-tokens)",
    "eval_samples": "replies sampled per held-out prompt (as in training) besides the greedy one",
}


def add_rl_arguments(p: Any, data_help: str, defaults: RLOptions, flags: dict[str, str]) -> None:
    """Every RL stage's flags: the engine's, --ref, --think/--no-think and its RLOptions fields."""
    add_stage_arguments(p, data_help)
    g = p.add_argument_group("reinforcement learning")
    for name, help_text in flags.items():
        default = getattr(defaults, name)
        kind = type(default) if default is not None else str
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar=kind.__name__.upper(),
                       help=f"{help_text} (default {default})")  # fmt: skip
    g.add_argument("--ref", metavar="RUN_DIR", help="the frozen reference model (default: the --from run)")
    g.add_argument("--think", dest="think", type=_parse_bool, nargs="?", const=True, help="open a <think> block")
    g.add_argument("--no-think", dest="think", action="store_const", const=False, help="answer without thinking")


def rl_options(args: Any, run_info: dict, resume: bool, defaults: RLOptions) -> RLOptions:
    """Defaults < (with --resume) the options the run was started with < flags."""
    values = {**vars(defaults), **(run_info.get("rl", {}) if resume else {})}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    opts = type(defaults)(**values)
    opts.validate()
    return opts


def policy_setup(run: Any, opts: RLOptions, cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(model to train, loss, checkpoint) of the GRPO family: the policy alone, PolicyLoss, a run."""
    if opts.loss not in ("grpo", "dr_grpo", "cispo"):
        raise ConfigError(f"--loss {opts.loss!r}: one of grpo, dr_grpo, cispo")
    return run.model, PolicyLoss(opts), None


def prepare_rl(
    args: Any, stage: str, defaults: RLOptions, advantages: Any, stage_state: Any = None, setup: Any = policy_setup
):
    """The engine set up for an RL stage: options, prompts, reward, reference, rollout source.
    `setup(run, opts, cfg)` gives the model to train, its loss and checkpoint (PPO: actor + critic)."""
    cfg: TrainConfig = stage_options(
        args, lambda given: {**RL_DEFAULTS, **stage_defaults(args.parent, given.out, given.resume, RL_LR, DEFAULT_LR)}
    )
    run = start_from(cfg, args.parent)
    opts = rl_options(args, run.info, cfg.resume, defaults)
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
    ref_dir = args.ref or (run.info.get("reference") if cfg.resume else None)
    info = stage_info(stage, cfg, run, args, rl=vars(opts))
    info["reference"] = ref_dir or info["parent"]
    uses_reference = opts.beta > 0 or getattr(opts, "kl", 0) > 0
    reference = reference_model(run.model, tok, ref_dir) if uses_reference else None
    source = lambda t: RolloutSource(t, prompts, ids, reward, opts, advantages(opts), reference, stage_state)
    trainer = Trainer(cfg, model.train(), tok, prompts, info, loss, checkpoint, source=source)  # type: ignore[arg-type]
    check = None
    if held is not None:
        reward.check(held)

        def check() -> str:
            m = held_out_rewards(policy_of(trainer.sampling_model()), tok, held, reward, opts, opts.eval_samples)
            return describe_rewards(m, opts, len(held))

    return trainer, check


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
    add_rl_arguments(p, 'prompts .jsonl: {"conversations": [...], "answer": ...}', RLOptions(), FLAGS)


def main(args: Any) -> None:
    trainer, check = prepare_rl(args, "grpo", RLOptions(), group_relative)
    fit_and_report(trainer, check)
