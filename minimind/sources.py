"""What the training loop asks of a stage besides its loss: where each step's micro-batches come
from (a `BatchSource`; its state goes into the resume file), what its checkpoints hold (a
`RunCheckpoint`), and what a source may know of the run (a `Runtime`: device, dtype, process rank
and count, the models it may call), instead of the trainer.

`RowBatches` is the default source (rows of data in a seeded shuffled order); the RL stages' source
generates rollouts (minimind/rl/rollout.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minimind.checkpoint import WEIGHTS, load_weights, save_run
from minimind.config import TrainConfig
from minimind.data.batch import Batch, Rows, Sampler
from minimind.errors import ConfigError
from minimind.tokenizer import Tokenizer


@dataclass
class Runtime:
    """The run as a batch source sees it. `model` is the model trained (unwrapped: PPO's actor-critic);
    `train_model` the one the optimizer steps (wrapped, compiled), for forward passes whose numbers must
    be the training ones; `sampling_model()` the model whole on this process (under sharded engines a
    replica loaded with the current weights: call it once per rollout)."""

    cfg: TrainConfig
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    model: nn.Module
    train_model: nn.Module
    sampling_model: Callable[[], nn.Module]


class BatchSource:
    """Where each optimizer step's micro-batches come from. `next_step` and `steps_per_epoch` are
    required; the rest are no-ops unless a source has something to say."""

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def next_step(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step `step` (counted from 0)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What one optimizer step consumes (the trainer's start line)."""
        return ""

    def log_metrics(self) -> dict[str, float]:
        """The source's own metrics since the last log line (averaged over processes by the engine)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RowBatches(BatchSource):
    """The default source: `accumulation` global batches of rows per step, in a seeded shuffled order
    (a fresh one each epoch); every process draws the global batch and keeps its slice."""

    def __init__(self, rows: Rows, cfg: TrainConfig, rank: int, world: int):
        self.rows, self.cfg, self.rank, self.world = rows, cfg, rank, world
        self.sampler = Sampler(len(rows), cfg.seed)

    def steps_per_epoch(self) -> int:
        per_step = self.cfg.batch_size * self.cfg.accumulation * self.world
        if len(self.rows) < per_step:
            raise ConfigError(
                f"the data has {len(self.rows)} rows of {self.cfg.max_seq_len} tokens, fewer than one step "
                f"needs ({per_step}); lower --batch-size/--accumulation or set --max-steps"
            )
        return len(self.rows) // per_step

    def describe(self) -> str:
        c = self.cfg
        return (
            f"{c.batch_size}x{c.accumulation}x{self.world} rows x {c.max_seq_len} tokens "
            f"({len(self.rows)} rows in the data)"
        )

    def next_step(self, step: int) -> list[Batch]:
        B = self.cfg.batch_size
        out = []
        for _ in range(self.cfg.accumulation):
            rows = self.sampler.take(B * self.world)
            out.append(self.rows.batch(rows[self.rank * B : (self.rank + 1) * B]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class RunCheckpoint:
    """What a stage's checkpoint holds: a full run directory (weights, config, tokenizer, run.json),
    written into the checkpoint folder the engine gives (minimind/checkpoint.py publishes it).

    Stages that train only part of a model (LoRA) or more than one (PPO's critic) pass a subclass.
    The weights file carries the step in its metadata, so resume can check it against train_state.pt.
    """

    weights = WEIGHTS

    def save(self, trainer: Any, folder: Path, info: dict[str, Any], metadata: dict[str, str]) -> None:
        save_run(folder, trainer.model, trainer.tokenizer, info, weights_metadata=metadata)

    def load(self, trainer: Any, folder: Path) -> None:
        load_weights(trainer.model, folder / WEIGHTS)
