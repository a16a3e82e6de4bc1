"""Pretraining text -> one cached token file, tokenized once and reused by every run and epoch.

Each document becomes `<|im_start|> ids <|im_end|>` (BOS ... EOS) and all documents are concatenated
into one flat array on disk (uint16 when the vocabulary fits, else uint32), with the start offset of
every document beside it. The cache key is a hash of the input files' bytes, the tokenizer's JSON,
this format's version and `skip_bad_lines`: change any of them and the cache is rebuilt; otherwise it
is memory-mapped straight away. (A cache built while skipping bad lines must not serve a strict run:
that run has to stop at the first bad line with its FILE:LINE.) Tokenization runs in parallel in the
`tokenizers` Rust thread pool.

Bad lines: by default the first malformed line stops everything with `DataError: FILE:LINE: ...`;
with `skip_bad_lines` they are skipped, counted and reported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from minimind.checkpoint import atomic_write, atomic_write_text
from minimind.data.readers import iter_jsonl, iter_lines
from minimind.errors import DataError
from minimind.tokenizer import Tokenizer

CACHE_VERSION = 1
BATCH_DOCS = 2048


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINIMIND_CACHE", Path.home() / ".cache" / "minimind")) / "tokens"


@dataclass
class ReadStats:
    documents: int = 0
    skipped: list[str] = field(default_factory=list)  # "FILE:LINE: reason" of each skipped line


def iter_pretrain_texts(paths: list[str | Path], stats: ReadStats, skip_bad_lines: bool = False) -> Iterator[str]:
    """Documents of pretraining files: JSONL `{"text": str}` per line, or `.txt` one per line."""

    def bad(message: str) -> None:
        if not skip_bad_lines:
            raise DataError(message)
        stats.skipped.append(message)

    for path in paths:
        before = stats.documents
        if str(path).endswith(".txt"):
            for _, line in iter_lines(path):
                stats.documents += 1
                yield line
        else:
            for lineno, obj in iter_jsonl(path, stats.skipped if skip_bad_lines else None):
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


def save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to a temporary name
        np.save(f, array)


def file_digest(paths: list[str | Path], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(f"minimind-tokens-v{CACHE_VERSION}".encode())
    h.update(tokenizer.backend.to_str().encode())
    for path in paths:
        h.update(str(Path(path).name).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:24]


@dataclass
class TokenFile:
    """A flat token array and the offset where each document starts (plus the end)."""

    tokens: np.ndarray  # memmap, uint16 or uint32
    offsets: np.ndarray  # int64, len = documents + 1
    path: Path
    reused: bool
    skipped: list[str] = field(default_factory=list)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


@contextmanager
def cache_lock(base: Path) -> Iterator[None]:
    """Hold BASE.lock exclusively: of the processes that want one cache at once (the ranks of a
    torchrun on one machine, runs side by side), one builds it and the others wait here, then find
    it complete and memory-map it. The OS releases the lock if the builder dies; without `fcntl`
    (Windows) there is no waiting, and each process builds (atomically) as before."""
    base.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(base.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tokenize_files(
    paths: list[str | Path], tokenizer: Tokenizer, cache_dir: str | Path | None = None, skip_bad_lines: bool = False
) -> TokenFile:
    """Tokenize (or reuse the cache of) pretraining files."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such file")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(f"tokens-v{CACHE_VERSION}-{skip_bad_lines}-{file_digest(paths, tokenizer)}".encode())
    base = cache_dir / key.hexdigest()[:24]
    with cache_lock(base):  # one builder per cache: processes beside it wait, then reuse it
        meta_path = base.with_suffix(".json")
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return TokenFile(
                np.memmap(base.with_suffix(".bin"), dtype=dtype, mode="r"),
                np.load(base.with_suffix(".idx.npy")),
                base,
                True,
                meta["skipped"],
            )

        stats = ReadStats()
        pieces, lengths = [], []
        batch: list[str] = []

        def flush() -> None:
            for ids in tokenizer.encode_batch(batch):
                pieces.append(np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype))
                lengths.append(len(ids) + 2)
            batch.clear()

        for text in iter_pretrain_texts(paths, stats, skip_bad_lines):
            batch.append(text)
            if len(batch) == BATCH_DOCS:
                flush()
        flush()
        tokens = np.concatenate(pieces)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        atomic_write(base.with_suffix(".bin"), lambda tmp: tokens.tofile(tmp))
        atomic_write(base.with_suffix(".idx.npy"), lambda tmp: save_npy(tmp, offsets))
        # The metadata file is written last: its presence means the cache is complete.
        atomic_write_text(
            meta_path,
            json.dumps(
                {
                    "files": [str(p) for p in paths],
                    "documents": len(lengths),
                    "tokens": int(offsets[-1]),
                    "skipped": stats.skipped,
                }
            ),
        )
        return TokenFile(
            np.memmap(base.with_suffix(".bin"), dtype=dtype, mode="r"), offsets, base, False, stats.skipped
        )
