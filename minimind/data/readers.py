"""Readers for the file formats MiniMind accepts, with errors that name the file and line.

JSONL (one JSON object per line) and plain text (one document per line). UTF-8, with a BOM and
CRLF line endings tolerated; blank lines are skipped. A malformed line raises `DataError` naming
`FILE:LINE` unless the caller asks to skip and count bad lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from minimind.errors import DataError

if TYPE_CHECKING:
    from minimind.data.cache import Meter

T = TypeVar("T")


def iter_lines(path: str | Path, meter: Meter | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending) for each non-blank line of a UTF-8 file; every
    byte read is passed to `meter` (progress and the full content hash) when one is given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if meter is not None:
        meter.start_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if meter is not None:
                meter.read(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def iter_jsonl(
    path: str | Path, skipped: list[str] | None = None, meter: Meter | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line. A line that is not a JSON object is a DataError, or,
    when a `skipped` list is given, its message is appended there and reading goes on."""
    empty = True
    for lineno, line in iter_lines(path, meter):
        empty = False
        try:
            obj = json.loads(line)
            problem = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg} at column {e.colno})"
        if problem is None:
            yield lineno, obj
        elif skipped is None:
            raise DataError(f"{path}:{lineno}: {problem}")
        else:
            skipped.append(f"{path}:{lineno}: {problem}")
    if empty:
        raise DataError(f"{path}: file is empty")


def record_text(obj: dict[str, Any]) -> str | None:
    """All trainable text of one record in any MiniMind format (pretrain, SFT, DPO), or None."""
    if isinstance(obj.get("text"), str):
        return obj["text"]
    parts = []
    for key in ("conversations", "chosen", "rejected"):
        turns = obj.get(key)
        if isinstance(turns, list):
            for t in turns:
                if isinstance(t, dict):  # the text, and the reasoning, tools and calls written beside it
                    for k in ("reasoning_content", "content", "tools", "tool_calls"):
                        v = t.get(k)
                        if v and isinstance(v, (str, list, dict)):
                            parts.append(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
        elif isinstance(turns, str):
            parts.append(turns)
    if isinstance(obj.get("prompt"), str):
        parts.append(obj["prompt"])
    return "\n".join(parts) if parts else None


def iter_texts(paths: list[str | Path]) -> Iterator[str]:
    """Text of every record of every file: `.txt` lines as they are, JSONL via `record_text`."""
    for path in paths:
        if str(path).endswith(".txt"):
            count = 0
            for _, line in iter_lines(path):
                count += 1
                yield line
            if not count:
                raise DataError(f"{path}: file is empty")
            continue
        for lineno, obj in iter_jsonl(path):
            text = record_text(obj)
            if text is None:
                raise DataError(
                    f"{path}:{lineno}: no text found (expected a string 'text', or "
                    "'conversations' / 'chosen' / 'rejected' message lists)"
                )
            yield text


def iter_checked(
    paths: list[str | Path],
    check: Callable[[dict[str, Any], str], T],
    what: str,
    skipped: list[str] | None = None,
    meter: Meter | None = None,
) -> Iterator[T]:
    """`check(obj, "FILE:LINE")` of every record of JSONL files. A record it refuses (a DataError) stops
    the reading, or, when a `skipped` list is given, its message is appended there and reading goes
    on; a file without one usable record is a DataError ("no usable {what}")."""
    for path in paths:
        count = 0
        for lineno, obj in iter_jsonl(path, skipped, meter):
            try:
                item = check(obj, f"{path}:{lineno}")
            except DataError as e:
                if skipped is None:
                    raise
                skipped.append(str(e))
                continue
            count += 1
            yield item
        if not count:
            raise DataError(f"{path}: no usable {what}")
