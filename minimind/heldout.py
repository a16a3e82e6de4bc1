"""Held-out documents scored token by token: one computation for `minimind eval --task ppl` and for
the `val_loss` / `val_bpb` that training logs every `--eval-every` steps.

Pretrain documents (`{"text"}` / .txt) are scored as `<|im_start|> text <|im_end|>`, every token after
the first; conversations (`{"conversations"}`) only on their trained assistant tokens, each reply's
`<|im_end|>` included. Each document is scored alone, never packed beside another:

    val_loss = nll = -(1/N) sum_t log p(x_t | x_<t)          (nats/token, N scored tokens)
    val_bpb  = N nll / ln 2 / bytes                           (bits per UTF-8 byte of the scored text)

bits per byte does not depend on the tokenizer, so runs with different vocabularies compare. A document
longer than max_len is cut into windows of max_len + 1 tokens that overlap by one: every target is
scored exactly once, each window starting with no earlier context.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minimind.data.readers import iter_jsonl
from minimind.errors import DataError
from minimind.losses import token_logps
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer


@torch.inference_mode()
def token_logprobs(model: MiniMind, seqs: list[list[int]], batch_size: int = 16) -> list[np.ndarray]:
    """log p(x_t | x_<t) for t = 1..n-1 of every sequence x (n - 1 values each, float32).

    Sequences are sorted by length and right-padded into batches. Right padding needs no mask:
    causal attention never looks ahead, so every real token sees (and is placed) as if alone.
    """
    device = next(model.parameters()).device
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(seqs)
    order = sorted((i for i in range(len(seqs)) if len(seqs[i]) > 1), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(seqs[rows[0]]) - 1
        inputs = torch.full((len(rows), width), model.cfg.pad_token_id, dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            s = torch.tensor(seqs[i], dtype=torch.long)
            inputs[r, : len(s) - 1], targets[r, : len(s) - 1] = s[:-1], s[1:]
        logp = token_logps(model(inputs.to(device)).logits, targets.to(device)).float().cpu().numpy()
        for r, i in enumerate(rows):
            out[i] = logp[r, : len(seqs[i]) - 1]
    return out


def windows(ids: list[int], scored: np.ndarray, max_len: int) -> list[tuple[list[int], np.ndarray]]:
    """Cut x (n tokens, `scored[t-1]` says whether target x_t counts) into pieces of at most
    max_len + 1 tokens overlapping by one, so each target is predicted exactly once."""
    return [(ids[s : s + max_len + 1], scored[s : s + max_len]) for s in range(0, max(len(ids) - 1, 1), max_len)]


@dataclass
class Doc:
    preview: str  # the text (pretrain) or the first reply (conversations), for reports
    ids: list[int]
    scored: np.ndarray  # scored[t - 1]: whether target ids[t] counts
    nbytes: int  # UTF-8 size of the scored text


@dataclass
class Scores:
    nll: np.ndarray  # per document: summed nats
    count: np.ndarray  # per document: scored tokens
    nbytes: int

    @property
    def loss(self) -> float:
        return float(self.nll.sum()) / max(int(self.count.sum()), 1)

    @property
    def bpb(self) -> float:
        return float(self.nll.sum()) / math.log(2) / max(self.nbytes, 1)


class HeldOut:
    """Documents read once (tokenized, windowed); `score(model)` any number of times."""

    def __init__(self, docs: list[Doc], max_len: int, where: str, format: str = "pretrain"):
        self.docs, self.where, self.format = docs, where, format  # format: pretrain | sft | mixed
        self.pieces = [(d, w) for d, doc in enumerate(docs) for w in windows(doc.ids, doc.scored, max_len)]
        if not sum(int(doc.scored.sum()) for doc in docs):
            raise DataError(f"{where}: nothing to score")

    @classmethod
    def read(cls, paths: list[str] | list[Path], tok: Tokenizer, max_len: int, limit: int | None = None) -> HeldOut:
        """The documents of every file (each file pretrain text or conversations, by its first record)."""
        from minimind.data.chat import encode_conversations, iter_conversations
        from minimind.data.tokens import ReadStats, iter_pretrain_texts

        docs: list[Doc] = []
        formats = set()
        for path in map(Path, paths):
            first = None if path.suffix == ".txt" else next(iter_jsonl(path), None)
            if first is not None and "text" not in first[1] and "conversations" not in first[1]:
                raise DataError(f'{path}:{first[0]}: expected {{"text": ...}} (pretrain) or {{"conversations": [...]}}')
            formats.add("sft" if first is not None and "text" not in first[1] else "pretrain")
            if first is not None and "text" not in first[1]:
                convs = list(itertools.islice(iter_conversations([path]), limit))
                for msgs, (ids, trained, _) in zip(convs, encode_conversations(tok, convs)):
                    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
                    docs.append(Doc(replies[0], ids.tolist(), trained[1:], sum(len(r.encode()) for r in replies)))
            else:
                texts = list(itertools.islice(iter_pretrain_texts([path], ReadStats()), limit))
                for text, ids in zip(texts, tok.encode_batch(texts)):
                    seq = [tok.bos_id, *ids, tok.eos_id]
                    docs.append(Doc(text, seq, np.ones(len(seq) - 1, dtype=bool), len(text.encode())))
        fmt = formats.pop() if len(formats) == 1 else "mixed"
        return cls(docs, max_len, ", ".join(map(str, paths)), fmt)

    def score(self, model: MiniMind, batch_size: int = 16) -> Scores:
        """Per-document summed nats and scored tokens (float64 sums of float32 log-probs)."""
        was_training = model.training
        model.eval()
        try:
            logps = token_logprobs(model, [w[0] for _, w in self.pieces], batch_size)
        finally:
            model.train(was_training)
        nll, count = np.zeros(len(self.docs)), np.zeros(len(self.docs), dtype=np.int64)
        for (d, (_, scored)), lp in zip(self.pieces, logps):
            nll[d] -= float(lp[scored].astype(np.float64).sum())
            count[d] += int(scored.sum())
        return Scores(nll, count, sum(doc.nbytes for doc in self.docs))
