"""Agentic RL's rollouts: the GRPO family's source (minimind/rl/rollout.py) with multi-turn episodes
(minimind/rl/episodes.py) in place of single replies, and its held-out check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from minimind.engine import autocast
from minimind.errors import ConfigError
from minimind.generate import SamplingParams
from minimind.options import opt
from minimind.rl.episodes import run_episodes, tool_metrics
from minimind.rl.rewards import RewardFn
from minimind.rl.rollout import RLOptions, RolloutSource, held_out_check
from minimind.tokenizer import Tokenizer
from minimind.toolbox import Toolbox, load_toolbox

AGENT_REWARD = "tool:answer + 0.5*tool:format + 0.5*tool:finished"


@dataclass
class AgentOptions(RLOptions):
    reward: str = opt(AGENT_REWARD, "reward spec: tool:answer, tool:calls, tool:format, tool:finished, rule:, rm:, hf:",
                      metavar="SPEC")  # fmt: skip
    loss: str = opt("cispo", "grpo | dr_grpo | cispo (upstream's agent RL uses cispo)")
    max_new_tokens: int = opt(128, "longest turn")
    max_turns: int = opt(3, "turns per episode: each may call tools, whose results start the next")
    tools: str = opt("builtin", "the tools that run: builtin, tool names, tools.json, my_tools.py (comma-separated)",
                     metavar="SPEC")  # fmt: skip

    def budget(self) -> int:
        return self.max_new_tokens * self.max_turns  # every turn the policy writes; tool turns carry no loss

    def validate(self) -> None:
        super().validate()
        if self.max_turns < 1:
            raise ConfigError("--max-turns must be at least 1")
        load_toolbox(self.tools)  # a bad --tools fails now, not at the first rollout


class AgentSource(RolloutSource):
    """Rollouts of episodes: G per prompt, all advancing turn by turn together; the reward judges whole
    episodes, the loss sees only the policy's own tokens."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.toolbox = load_toolbox(self.opts.tools)
        if not any(p.tools for p in self.prompts):
            where = self.prompts[0].where.rpartition(":")[0]
            raise ConfigError(f"{where}: no prompt offers tools (list them on the system message: 'tools')")

    def sample(self, model: nn.Module, index: np.ndarray, each: np.ndarray) -> tuple[list, list, list]:
        t, o, tok = self.rt, self.opts, self.rt.tokenizer
        params = SamplingParams(o.max_new_tokens, o.temperature, top_p=1.0, top_k=0, stop_ids=tok.stop_ids)
        with autocast(t.device, t.dtype):
            episodes = run_episodes(
                model,
                tok,
                [self.prompts[i] for i in each],
                self.toolbox,
                params,
                o.max_turns,
                self.limit(model),
                o.think,
                keys=self.sampling_keys(len(each)),
                prompt_ids=[self.prompt_ids[i] for i in each],
                batch_size=self.cfg.batch_size * o.num_generations,
            )
        self._record(
            {
                "turns": float(np.mean([len(e.turns) for e in episodes])),
                **tool_metrics([self.prompts[i] for i in each], episodes),
            }
        )
        return [e.ids for e in episodes], episodes, [e.trained for e in episodes]

    def limit(self, model: nn.Module) -> int:
        """The most positions an episode may fill: the training rows' and the model's."""
        return min(self.cfg.max_seq_len, model.cfg.max_position_embeddings)


def held_out_episodes(
    model: nn.Module,
    tok: Tokenizer,
    prompts: list,
    reward: RewardFn,
    opts: AgentOptions,
    samples: int = 0,
    toolbox: Toolbox | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """The agent's held-out check: greedy episodes (and `samples` sampled ones per prompt from a fixed
    seed) on `prompts`: mean reward, each term, and the tool metrics (valid calls, answered, correct)."""
    toolbox = toolbox or load_toolbox(opts.tools)
    limit = limit or model.cfg.max_position_embeddings

    def measure(params: SamplingParams, k: int) -> dict[str, float]:
        each = [p for p in prompts for _ in range(k)]
        episodes = run_episodes(model, tok, each, toolbox, params, opts.max_turns, limit, opts.think)
        r = reward(prompts, episodes)
        parts = {name: float(v.mean()) for name, v in r.parts.items()}
        return {"reward": float(r.total.mean()), **parts, **tool_metrics(each, episodes)}

    return held_out_check(model, tok, opts, measure, samples)
