"""What the training loop consumes: a `Batch` of rows (inputs, labels with IGNORE where no loss is
taken, optional document ids), `Rows` (anything that makes a batch from row indices: packed text,
conversations, preference pairs), and the `Sampler` whose position in a seeded order of rows is the
resumable state of the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss is taken
    segment_ids: torch.Tensor | None = None  # (B, T) document index, when attention is kept per document

    def to(self, device: torch.device) -> Batch:
        seg = None if self.segment_ids is None else self.segment_ids.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True), seg)

    @property
    def num_tokens(self) -> int:
        """Tokens that carry loss (counted on the host, before the batch moves to a device); the
        engine's throughput counts these."""
        return int((self.labels != IGNORE).sum())

    @property
    def loss_units(self) -> float:
        """What the stage's loss sum is divided by, summed over the optimizer step: its loss tokens,
        unless a stage counts otherwise (pairs for DPO, the summed token weights for reasoning)."""
        return self.num_tokens


class Rows(Protocol):
    """What the engine trains on: a number of rows, and a batch for any list of row indices."""

    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> Batch: ...


class Sampler:
    """Row indices in a fresh seeded permutation each epoch; (epoch, position) is the whole state.

    Each call hands out `n` indices; a draw that crosses the end of an epoch continues in the next
    one. Deterministic given the seed, so resuming from a saved state repeats nothing and skips nothing.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        if num_rows == 0:
            raise ValueError("no training rows: the data is shorter than one sequence")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n, self.num_rows - self.position)
            out.append(self._order[self.position : self.position + k])
            self.position += k
            n -= k
        return np.concatenate(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"the data changed since the checkpoint ({state['num_rows']} rows, seed {state['seed']}"
                f" then; {self.num_rows} rows, seed {self.seed} now): cannot resume exactly"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
