"""Token caches on disk: keyed by what went in, built once per machine, streamed in bounded memory.

Every data format (pretraining text, conversations, preference pairs) is tokenized once into flat
arrays on disk (`BASE.bin` token ids, optional per-token columns such as `BASE.mask`, per-record
arrays such as `BASE.idx.npy` offsets) and memory-mapped by every later run, epoch and rank. This
module holds what all formats share; each format says only how a batch of records becomes columns.

**Key.** A cache is named by the format and its parameters, the tokenizer, `skip_bad_lines`, and a
*quick key* of each input file: its size, modification time and a sha256 of 64 evenly spaced
64 KiB samples (of the whole file when it is under 64 MiB). The quick key costs milliseconds on a
14 GB file, where a full hash reads it all. The full sha256 of every byte is computed anyway on the
one pass that tokenizes it and kept in the cache's metadata: when the quick key misses because a
file was copied or touched, a complete cache of the same parameters and file sizes is checked
against a full hash of the input (seconds, with a progress bar) and reused when equal, rather than
tokenizing again (an hour for upstream's largest file). An edit that keeps a file's size and
modification time and falls between the samples would go unseen: it takes a deliberate effort
(`touch -d` the old time back); delete the cache (`$MINIMIND_CACHE`, default ~/.cache/minimind) then.

**Once per machine.** Under a launcher (`torchrun`, `deepspeed`: LOCAL_RANK and WORLD_SIZE set) only
local rank 0 of each node builds; the other ranks poll for the complete cache (or for the failure
marker rank 0 writes when the data is bad, and raise the same DataError) and then memory-map it.
Builders beside each other (runs on one machine, nodes on a shared file system) serialise on
`BASE.lock`; where the file system has no locks, each builds into files of its own and the renames
are atomic, so the last one wins with the same content.

**Interrupted builds.** Columns stream into `*.partial-HOST-PID` files that are renamed into place
only when complete, and the metadata `BASE.json` is written last: a build killed at any point
leaves no cache a later run mistakes for complete (the next builder removes the dead one's files).

**Memory.** Records go through in batches; only per-record lengths (8 bytes each) stay in memory,
so the peak does not grow with the file's size. The Rust tokenizer encodes batch k + 1 (releasing
the GIL, on all cores) while Python reads and writes batch k.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from minimind.errors import DataError
from minimind.fileio import atomic_write, atomic_write_text
from minimind.tokenizer import Tokenizer

SAMPLE, SAMPLES, SMALL = 1 << 16, 64, 1 << 26
KEEP_SKIPPED = 1000  # messages of skipped lines kept in the metadata (all are counted)
POLL_S = 0.5

B = TypeVar("B")
R = TypeVar("R")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINIMIND_CACHE", Path.home() / ".cache" / "minimind")) / "tokens"


class Skipped(list):
    """Messages of the lines skipped with --skip-bad-lines: the first KEEP_SKIPPED kept, all counted."""

    def __init__(self, messages: Iterable[str] = (), count: int | None = None):
        super().__init__(messages)
        self.count = len(self) if count is None else count

    def append(self, message: str) -> None:  # type: ignore[override]
        self.count += 1
        if len(self) < KEEP_SKIPPED:
            super().append(message)


class Meter:
    """Bytes read so far and a running sha256 of them: the input's full content hash, computed on the
    one pass that tokenizes it (`minimind.data.readers.iter_lines` feeds it)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.hasher = hashlib.sha256()

    def start_file(self, path: str | Path) -> None:
        self.hasher.update(f"\0{os.path.getsize(path)}\0".encode())

    def read(self, raw: bytes) -> None:
        self.bytes += len(raw)
        self.hasher.update(raw)


def quick_key(path: str | Path) -> dict[str, Any]:
    """Size, modification time and a hash of 64 evenly spaced samples (the whole file when small)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= SMALL:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            for k in range(SAMPLES):
                f.seek((st.st_size - SAMPLE) * k // (SAMPLES - 1))
                h.update(f.read(SAMPLE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": h.hexdigest()[:32]}


def content_hash(paths: list[str | Path]) -> str:
    """sha256 of every byte of the inputs (with each size before it), as `Meter` computes it."""
    meter = Meter()
    with progress(sum(os.path.getsize(p) for p in paths), "hashing") as bar:
        for path in paths:
            meter.start_file(path)
            with open(path, "rb") as f:
                while chunk := f.read(1 << 23):
                    meter.read(chunk)
                    bar.update(len(chunk))
    return meter.hasher.hexdigest()


def progress(total: int | None, desc: str, unit: str = "B"):  # noqa: ANN201 - a tqdm bar
    """A progress bar on stderr, shown only when stderr is a terminal (piped logs stay clean)."""
    from tqdm.auto import tqdm

    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False, mininterval=0.5, **scale)


def pipelined(batches: Iterable[B], encode: Callable[[B], R]) -> Iterator[tuple[B, R]]:
    """(batch, encode(batch)) in order, encoding the next batch in a thread while the caller works on
    this one. The Rust tokenizer releases the GIL, so reading, validating and writing in Python
    overlap with encoding on every core."""
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to a temporary name
        np.save(f, array)


class Columns:
    """Per-token arrays streamed to `BASE<suffix>.partial-HOST-PID` files as batches come, and the
    per-record arrays (small) gathered in memory; `commit` renames everything into place."""

    def __init__(self, base: Path, token_columns: dict[str, type], tag: str):
        self.base, self.tag = base, tag
        self.dtypes = token_columns
        self.files = {s: open(self.partial(s), "wb") for s in token_columns}
        self.records: dict[str, list[np.ndarray]] = {}
        self.count = 0  # tokens written

    def partial(self, suffix: str) -> Path:
        return self.base.with_name(f"{self.base.name}{suffix}.partial-{self.tag}")

    def write(self, **arrays: np.ndarray) -> None:
        """One batch: each token column's array (all the same length)."""
        n = None
        for suffix, array in arrays.items():
            np.ascontiguousarray(array, dtype=self.dtypes[suffix]).tofile(self.files[suffix])
            n = len(array) if n is None else n
        self.count += n or 0

    def add_records(self, **arrays: np.ndarray | list) -> None:
        for suffix, array in arrays.items():
            self.records.setdefault(suffix, []).append(np.asarray(array, dtype=np.int64))

    def record(self, suffix: str) -> np.ndarray:
        parts = self.records.get(suffix, [])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def commit(self, arrays: dict[str, np.ndarray]) -> None:
        """Close, fsync and rename the token columns, then write the per-record `arrays` (npy)."""
        for suffix, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.partial(suffix), self.base.with_name(self.base.name + suffix))
        for suffix, array in arrays.items():
            atomic_write(self.base.with_name(self.base.name + suffix), lambda tmp, a=array: save_npy(tmp, a))

    def abort(self) -> None:
        for suffix, f in self.files.items():
            f.close()
            self.partial(suffix).unlink(missing_ok=True)


@dataclass
class Entry:
    """A complete cache: where its files are (`base`), its metadata, and whether it was reused."""

    base: Path
    meta: dict[str, Any]
    reused: bool
    skipped: Skipped = field(default_factory=Skipped)

    def path(self, suffix: str) -> Path:
        return self.base.with_name(self.base.name + suffix)

    def memmap(self, suffix: str, dtype: type) -> np.ndarray:
        path = self.path(suffix)
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def load(self, suffix: str) -> np.ndarray:
        return np.load(self.path(suffix))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold `path` exclusively (fcntl.flock). The OS releases it if the holder dies; without fcntl
    (Windows) there is no waiting, and builders beside each other each build atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def builds_here() -> bool:
    """False for the ranks of a launched job other than each node's local rank 0: they wait."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world <= 1 or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def remove_dead_partials(base: Path) -> None:
    """Files of builds on this host whose process is gone (killed mid-way)."""
    host = socket.gethostname()
    for path in base.parent.glob(f"{base.name}.*.partial-{host}-*"):
        pid = int(path.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass


Build = Callable[[Columns, Meter, Any], dict[str, Any]]


def cached(
    kind: str,
    params: dict[str, Any],
    paths: list[str | Path],
    tokenizer: Tokenizer,
    token_columns: dict[str, type],
    build: Build,
    cache_dir: str | Path | None = None,
) -> Entry:
    """The complete cache of `paths` in this format: reused, found by content, waited for, or built.

    `build(columns, meter, bar)` reads the inputs (feeding `meter`), writes token columns batch by
    batch and per-record arrays via `columns.add_records`, and returns the metadata to keep (counts,
    `skipped`); raising DataError leaves no cache and a failure marker the waiting ranks read.
    """
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such file")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = [quick_key(p) for p in paths]
    tok_hash = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:32]
    ident = {"kind": kind, "params": params, "tokenizer": tok_hash}
    key = hashlib.sha256(json.dumps({**ident, "files": files}, sort_keys=True).encode()).hexdigest()[:24]
    base = cache_dir / f"{kind}-{key}"
    meta_path, failed_path = base.with_suffix(".json"), base.with_suffix(".failed")

    def complete() -> Entry | None:
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        target = cache_dir / meta["alias"] if "alias" in meta else base
        if "alias" in meta:
            if not target.with_suffix(".json").is_file():  # the cache it pointed to was deleted
                return None
            meta = json.loads(target.with_suffix(".json").read_text())
        return Entry(target, meta, True, Skipped(meta.get("skipped", []), meta.get("skipped_count")))

    if not builds_here():
        started, said = time.monotonic(), 0.0
        while (entry := complete()) is None:
            if failed_path.is_file():
                raise DataError(failed_path.read_text())
            waited = time.monotonic() - started
            if waited - said >= 60 or not said:
                print(f"waiting for local rank 0 to tokenize {paths[0]} ({waited:.0f} s)", file=sys.stderr, flush=True)
                said = max(waited, 1e-9)
            time.sleep(POLL_S)
        return entry

    with file_lock(base.with_suffix(".lock")):
        if (entry := complete()) is not None:
            return entry
        if (entry := same_content(cache_dir, ident, paths, files, base)) is not None:
            return entry
        remove_dead_partials(base)
        total = sum(f["size"] for f in files)
        size = f"{len(paths)} file(s), {total / 2**30:.2f} GiB"
        print(f"tokenizing {size}, into {cache_dir} (once; later runs reuse it)", flush=True)
        columns = Columns(base, token_columns, f"{socket.gethostname()}-{os.getpid()}")
        meter, t0 = Meter(), time.perf_counter()
        try:
            with progress(total, f"tokenizing {Path(paths[0]).name}") as bar:
                meta = build(columns, meter, bar)
            meta.update(ident, files=files, content=meter.hasher.hexdigest(), tokens=columns.count)
            skipped = meta.pop("skipped", Skipped())
            meta.update(skipped=list(skipped), skipped_count=skipped.count)
            columns.commit(meta.pop("arrays"))
        except DataError as e:
            columns.abort()
            atomic_write_text(failed_path, str(e))
            raise
        except BaseException:
            columns.abort()
            raise
        atomic_write_text(meta_path, json.dumps(meta))  # last: its presence means the cache is complete
        failed_path.unlink(missing_ok=True)
        dt = time.perf_counter() - t0
        rate = columns.count / max(dt, 1e-9)
        print(
            f"tokenized {meta.get('records', 0):,} records, {columns.count:,} tokens in {dt:.1f} s "
            f"({rate / 1e6:.2f}M tokens/s, {total / 2**20 / max(dt, 1e-9):.1f} MiB/s)",
            flush=True,
        )
        return Entry(base, meta, False, skipped)


def same_content(
    cache_dir: Path, ident: dict[str, Any], paths: list[str | Path], files: list[dict], base: Path
) -> Entry | None:
    """A complete cache of the same format, parameters and file sizes whose full hash equals the
    inputs' (a copied or touched file): recorded as an alias of this key and reused."""
    sizes = [f["size"] for f in files]
    candidates = []
    for meta_path in cache_dir.glob(f"{ident['kind']}-*.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if "alias" in meta or any(meta.get(k) != v for k, v in ident.items()):
            continue
        if [f["size"] for f in meta.get("files", [])] == sizes:
            candidates.append((meta_path, meta))
    if not candidates:
        return None
    digest = content_hash(paths)
    for meta_path, meta in candidates:
        if meta.get("content") == digest:
            target = meta_path.with_suffix("")
            atomic_write_text(base.with_suffix(".json"), json.dumps({"alias": target.name}))
            return Entry(target, meta, True, Skipped(meta.get("skipped", []), meta.get("skipped_count")))
    return None
