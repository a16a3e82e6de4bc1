"""Pretraining text -> one cached token file, tokenized once and reused by every run, epoch and rank.

Each document becomes `<|im_start|> ids <|im_end|>` (BOS ... EOS) and all documents are concatenated
into one flat array on disk (uint16 when the vocabulary fits, else uint32), with the start offset of
every document beside it. Keys, streaming, one build per machine and interrupted builds: see
`minimind.data.cache`. (A cache built while skipping bad lines never serves a strict run: that run
has to stop at the first bad line with its FILE:LINE.)

Bad lines: by default the first malformed line stops everything with `DataError: FILE:LINE: ...`;
with `skip_bad_lines` they are skipped, counted and reported.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minimind.data.cache import Columns, Meter, Skipped, cached, pipelined
from minimind.data.readers import iter_jsonl, iter_lines
from minimind.errors import DataError
from minimind.tokenizer import Tokenizer

CACHE_VERSION = 2
BATCH_DOCS = 2048


@dataclass
class ReadStats:
    documents: int = 0
    skipped: Skipped = field(default_factory=Skipped)  # "FILE:LINE: reason" of each skipped line


def iter_pretrain_texts(
    paths: list[str | Path], stats: ReadStats, skip_bad_lines: bool = False, meter: Meter | None = None
) -> Iterator[str]:
    """Documents of pretraining files: JSONL `{"text": str}` per line, or `.txt` one per line."""

    def bad(message: str) -> None:
        if not skip_bad_lines:
            raise DataError(message)
        stats.skipped.append(message)

    for path in paths:
        before = stats.documents
        if str(path).endswith(".txt"):
            for _, line in iter_lines(path, meter):
                stats.documents += 1
                yield line
        else:
            for lineno, obj in iter_jsonl(path, stats.skipped if skip_bad_lines else None, meter):
                text = obj.get("text")
                if not isinstance(text, str):
                    what = "missing" if "text" not in obj else f"a {type(text).__name__}, not a string"
                    bad(f"{path}:{lineno}: 'text' is {what}")
                elif not text.strip():
                    bad(f"{path}:{lineno}: 'text' is empty")
                else:
                    stats.documents += 1
                    yield text
        if stats.documents == before:
            raise DataError(f"{path}: no usable documents")


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def token_dtype(tokenizer: Tokenizer) -> type:
    return np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32


def wrap_documents(encoded: list[list[int]], bos: int, eos: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(BOS ids EOS of every document, one flat array; each one's length), without a Python list per token."""
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 2
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]), dtype=dtype)
    body = np.ones(len(out), dtype=bool)
    body[ends - lengths] = body[ends - 1] = False
    out[ends - lengths], out[ends - 1] = bos, eos
    out[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=len(out) - 2 * len(encoded))
    return out, lengths


@dataclass
class TokenFile:
    """A flat token array and the offset where each document starts (plus the end)."""

    tokens: np.ndarray  # memmap, uint16 or uint32
    offsets: np.ndarray  # int64, len = documents + 1
    path: Path
    reused: bool
    skipped: Skipped = field(default_factory=Skipped)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def tokenize_files(
    paths: list[str | Path], tokenizer: Tokenizer, cache_dir: str | Path | None = None, skip_bad_lines: bool = False
) -> TokenFile:
    """Tokenize (or reuse the cache of) pretraining files."""
    dtype = token_dtype(tokenizer)

    def build(columns: Columns, meter: Meter, bar: Any) -> dict[str, Any]:
        stats = ReadStats()
        texts = batched(iter_pretrain_texts(paths, stats, skip_bad_lines, meter), BATCH_DOCS)
        for _, encoded in pipelined(texts, tokenizer.encode_batch):
            tokens, lengths = wrap_documents(encoded, tokenizer.bos_id, tokenizer.eos_id, dtype)
            columns.write(**{".bin": tokens})
            columns.add_records(lengths=lengths)
            bar.update(meter.bytes - bar.n)
            bar.set_postfix_str(f"{stats.documents:,} docs, {columns.count / 1e6:.1f}M tokens", refresh=False)
        offsets = offsets_of(columns.record("lengths"))
        return {"arrays": {".idx.npy": offsets}, "records": len(offsets) - 1, "skipped": stats.skipped}

    params = {"version": CACHE_VERSION, "skip_bad_lines": skip_bad_lines}
    entry = cached("tokens", params, paths, tokenizer, {".bin": dtype}, build, cache_dir)
    return TokenFile(entry.memmap(".bin", dtype), entry.load(".idx.npy"), entry.base, entry.reused, entry.skipped)
