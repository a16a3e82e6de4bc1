"""Packing documents into fixed-length rows.

Row i of length T is tokens[i*T : i*T + T + 1] of the concatenated stream: inputs are its first T
tokens, labels its last T. Consecutive rows overlap by one token, so every token of the stream is
an input exactly once and a label exactly once, and no compute goes to padding (upstream pads
each document to max_seq_len). With `doc_mask`, each row carries segment ids so attention stays
inside a document and positions restart at each one, exactly as if documents were separate.
"""

from __future__ import annotations

import numpy as np
import torch

from minimind.data.batch import IGNORE, Batch


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
