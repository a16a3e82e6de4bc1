"""Agentic RL: GRPO-family RL on multi-turn episodes in which the policy calls sandboxed tools.

data:    prompts whose system message offers tools, with `gt`, the values a right final answer gives
         (upstream's agent_rl.jsonl; minimind/data/prompts.py)
models:  the policy (--from, an SFT run that has seen tool calls); a frozen reference when beta > 0
episode: the policy writes a turn; each <tool_call> in it runs in the toolbox (--tools; never `eval` of
         model text, minimind/toolbox.py) and the results come back as a tool turn; up to --max-turns
         turns, all G episodes of all prompts advancing together (minimind/rl/episodes.py)
reward:  per episode (--reward, default: tool:answer + 0.25 tool:calls + 0.5 tool:format + 0.5 tool:finished):
         the share of `gt` values in the final answer, valid calls, closed tags, a penalty when unfinished
advantage: per group of G episodes, A_i = (r_i - mean_G r) / (std_G r + eps)   (dr_grpo: no std division)
loss:    --loss cispo (default, as upstream) | grpo | dr_grpo on the policy's own tokens only: tool
         results and turn headers carry no loss (minimind/losses.py `policy_loss`)
metrics: as GRPO, plus turns per episode, valid-call share, episodes that used tools, answered, correct.
"""

from __future__ import annotations

from typing import Any

from minimind.rl.agent import AgentOptions, AgentSource, held_out_episodes
from minimind.stages.common import fit_and_report
from minimind.stages.rl_common import add_rl_arguments, group_relative, prepare_rl


def add_arguments(p: Any) -> None:
    add_rl_arguments(
        p, AgentOptions, data='prompts .jsonl: {"conversations": [system with "tools", user], "gt": [...]}'
    )


def prepare(args: Any):
    """(the engine set up for `minimind agent`, its held-out check or None)."""
    return prepare_rl(args, "agent", AgentOptions, group_relative, source=AgentSource, held_out=held_out_episodes)


def main(args: Any) -> None:
    trainer, check = prepare(args)
    fit_and_report(trainer, check)
