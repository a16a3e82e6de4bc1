"""Files written whole or not at all: each goes to a temporary name in the same directory, is
fsynced, and is renamed over the target, so a crash leaves the old file or the new one, never half.
The bottom of the package: it imports nothing of MiniMind's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_point(what: str) -> None:
    """Called just before each change a checkpoint save makes on disk (a rename, a link, a removal).
    Does nothing; the fault-injection tests replace it to kill a save at every one of these points."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        write_point(f"rename {path}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
