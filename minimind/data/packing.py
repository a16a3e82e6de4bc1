"""Packing documents into fixed-length rows, and a sampler whose position is resumable state.

Row i of length T is tokens[i*T : i*T + T + 1] of the concatenated stream: inputs are its first T
tokens, labels its last T. Consecutive rows overlap by one token, so every token of the stream is
an input exactly once and a label exactly once, and no compute goes to padding (upstream pads
each document to max_seq_len). With `doc_mask`, each row carries segment ids so attention stays
inside a document and positions restart at each one, exactly as if documents were separate.
"""

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


class PackedRows:
    """Fixed-length training rows cut from a token stream (see module docstring)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, doc_mask: bool = False):
        self.tokens, self.offsets, self.seq_len, self.doc_mask = tokens, offsets, seq_len, doc_mask
        self.num_rows = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, rows: np.ndarray) -> Batch:
        T = self.seq_len
        starts = np.asarray(rows, dtype=np.int64)[:, None] * T
        index = starts + np.arange(T + 1)[None, :]
        chunk = torch.from_numpy(self.tokens[index].astype(np.int64))
        seg = None
        if self.doc_mask:
            doc = np.searchsorted(self.offsets, index[:, :-1], side="right") - 1
            seg = torch.from_numpy(doc - doc[:, :1])  # small ids, 0 for the first document of a row
            # The first token of a document cannot be predicted from the previous document.
            chunk_labels = chunk[:, 1:].clone()
            next_doc = np.searchsorted(self.offsets, index[:, 1:], side="right") - 1
            chunk_labels[torch.from_numpy(next_doc != doc)] = IGNORE
            return Batch(chunk[:, :-1], chunk_labels, seg)
        return Batch(chunk[:, :-1], chunk[:, 1:].clone(), seg)


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
