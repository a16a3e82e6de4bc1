"""Conversations for SFT and every stage after it: validation, ChatML ids with a loss mask,
truncation, and rows that pack several conversations with attention kept inside each.

A conversation renders as ChatML, exactly what the tokenizer's chat template produces:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>

(the newline after the last `<|im_end|>` is dropped: nothing is learned from it). A token is
*trained* when it lies inside an assistant reply or is that reply's closing `<|im_end|>`: the
model learns to write replies and to end them, never to write the user's text, the system prompt
or the `<|im_start|>assistant\\n` header. Every assistant turn of a multi-turn conversation is trained.

Truncation: a conversation longer than the row (max_seq_len + 1 tokens) loses whole later turns,
cut after the last assistant reply that still fits, so no reply is left without its end; one whose
first reply does not fit is dropped. Both are counted and reported.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.checkpoint import atomic_write, atomic_write_text
from minimind.data.packing import IGNORE, Batch
from minimind.data.readers import iter_jsonl
from minimind.data.tokens import cache_lock, default_cache_dir, file_digest, save_npy
from minimind.errors import DataError
from minimind.tokenizer import BOS, EOS, PAD, Tokenizer

ROLES = ("system", "user", "assistant")
CHAT_CACHE_VERSION = 2
BATCH = 1024


def check_messages(
    messages: Any, where: str, key: str = "conversations", final: str | None = "assistant"
) -> list[dict]:
    """The validated messages as [{"role", "content"}] (extra keys dropped), or DataError naming `where`.

    Rules: a list of objects with a known role and non-empty string content; an optional system
    message first, then user and assistant alternating, starting with user and ending with `final`.
    """
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{key}' is a {type(messages).__name__}, not a list of messages")
    if not messages:
        raise DataError(f"{where}: '{key}' is empty")
    out = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is a {type(m).__name__}, not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r} (expected system, user, assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has no string 'content'")
        if not content.strip():
            raise DataError(f"{where}: message {i} ({role}) has empty content")
        control = next((t for t in (BOS, EOS, PAD) if t in content), None)
        if control:
            raise DataError(f"{where}: message {i} ({role}) contains the control token {control} in its text")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            why = "only the first message may be system" if m["role"] == "system" else "turns must alternate"
            raise DataError(f"{where}: message {i + 1} is {m['role']}, expected {expected} ({why})")
    if len(out) == start:
        raise DataError(f"{where}: '{key}' has only a system message")
    if final and out[-1]["role"] != final:
        raise DataError(
            f"{where}: the conversation ends on a {out[-1]['role']} turn; it must end with an {final} reply"
        )
    return out


def render(messages: list[dict]) -> str:
    """The conversation as ChatML text (what the chat template writes, minus the final newline)."""
    return "\n".join(f"{BOS}{m['role']}\n{m['content']}{EOS}" for m in messages)


def encode_conversations(
    tokenizer: Tokenizer, conversations: list[list[dict]], max_len: int | None = None
) -> list[tuple[np.ndarray, np.ndarray, bool] | None]:
    """For each conversation (ids, trained mask, was cut), cut to at most `max_len` ids at a reply's
    end; None when not even its first reply fits.

    Each message's header, content and `<|im_end|>` are tokenized separately and joined, so no token
    straddles a header and a reply (a `\n\n` merge could otherwise swallow a reply's first newline),
    the mask is exact by construction, and a reply is tokenized exactly as it is generated after
    `<|im_start|>assistant\n`. Contents go through the Rust tokenizer in one parallel batch.
    """
    heads = {role: tokenizer.encode(f"{BOS}{role}\n") for role in ROLES}
    newline = tokenizer.encode("\n")
    bodies = iter(tokenizer.encode_batch([m["content"] for c in conversations for m in c]))
    out: list[tuple[np.ndarray, np.ndarray, bool] | None] = []
    for conversation in conversations:
        ids: list[int] = []
        trained: list[bool] = []
        ends = []  # length of ids just past each assistant reply's <|im_end|>
        for j, m in enumerate(conversation):
            head = (newline if j else []) + heads[m["role"]]
            body = next(bodies) + [tokenizer.eos_id]
            ids += head + body
            trained += [False] * len(head) + [m["role"] == "assistant"] * len(body)
            if m["role"] == "assistant":
                ends.append(len(ids))
        cut = max_len is not None and len(ids) > max_len
        if cut:
            fitting = [e for e in ends if e <= max_len]  # type: ignore[operator]
            if not fitting:
                out.append(None)
                continue
            ids, trained = ids[: fitting[-1]], trained[: fitting[-1]]
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool), cut))
    return out


def iter_conversations(paths: list[str | Path], skipped: list[str] | None = None) -> Iterator[list[dict]]:
    """Validated conversations of SFT-format JSONL files; bad lines raise, or are counted in `skipped`."""
    for path in paths:
        count = 0
        for lineno, obj in iter_jsonl(path, skipped):
            where = f"{path}:{lineno}"
            try:
                if "conversations" not in obj:
                    raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [...]}})")
                messages = check_messages(obj["conversations"], where)
            except DataError as e:
                if skipped is None:
                    raise
                skipped.append(str(e))
                continue
            count += 1
            yield messages
        if not count:
            raise DataError(f"{path}: no usable conversations")


@dataclass
class ChatTokens:
    """Conversations as one flat token array, a trained mask beside it, and per-conversation offsets."""

    tokens: np.ndarray
    trained: np.ndarray  # bool per token: its label is learned
    offsets: np.ndarray  # int64, conversations + 1
    truncated: int = 0  # conversations that lost later turns
    dropped: int = 0  # conversations whose first reply did not fit
    skipped: list[str] = field(default_factory=list)
    reused: bool = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.trained[a:b])

    def report(self) -> str:
        parts = [f"{len(self):,} conversations, {int(self.offsets[-1]):,} tokens ({int(self.trained.sum()):,} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated to their last whole reply")
        if self.dropped:
            parts.append(f"{self.dropped:,} dropped (first reply longer than the row)")
        if self.skipped:
            parts.append(f"{len(self.skipped):,} bad lines skipped")
        return ", ".join(parts)


def tokenize_conversations(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    max_seq_len: int,
    cache_dir: str | Path | None = None,
    skip_bad_lines: bool = False,
) -> ChatTokens:
    """Tokenize SFT files once (cached like pretraining tokens, keyed also by max_seq_len)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such file")
    key = f"chat-v{CHAT_CACHE_VERSION}-{max_seq_len}-{skip_bad_lines}-{file_digest(paths, tokenizer)}"
    h = hashlib.sha256(key.encode())
    base = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"chat-{h.hexdigest()[:24]}"
    with cache_lock(base):  # one builder per cache (see minimind.data.tokens.cache_lock)
        meta_path = base.with_suffix(".json")
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return ChatTokens(
                np.memmap(base.with_suffix(".bin"), dtype=dtype, mode="r"),
                np.memmap(base.with_suffix(".mask"), dtype=bool, mode="r"),
                np.load(base.with_suffix(".idx.npy")),
                meta["truncated"],
                meta["dropped"],
                meta["skipped"],
                reused=True,
            )
        skipped: list[str] = []
        ids_parts, mask_parts, lengths = [], [], []
        truncated = dropped = 0
        batch: list[list[dict]] = []

        def flush() -> None:
            nonlocal truncated, dropped
            for item in encode_conversations(tokenizer, batch, max_seq_len + 1):
                if item is None:
                    dropped += 1
                    continue
                ids, trained, was_cut = item
                truncated += was_cut
                ids_parts.append(ids.astype(dtype))
                mask_parts.append(trained)
                lengths.append(len(ids))
            batch.clear()

        for messages in iter_conversations(paths, skipped if skip_bad_lines else None):
            batch.append(messages)
            if len(batch) == BATCH:
                flush()
        flush()
        if not lengths:
            raise DataError(f"{paths[0]}: no conversation fits in max_seq_len {max_seq_len}")
        tokens, trained = np.concatenate(ids_parts), np.concatenate(mask_parts)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        atomic_write(base.with_suffix(".bin"), lambda tmp: tokens.tofile(tmp))
        atomic_write(base.with_suffix(".mask"), lambda tmp: trained.tofile(tmp))
        atomic_write(base.with_suffix(".idx.npy"), lambda tmp: save_npy(tmp, offsets))
        meta = {"files": [str(p) for p in paths], "truncated": truncated, "dropped": dropped, "skipped": skipped}
        atomic_write_text(meta_path, json.dumps(meta))  # last: its presence means the cache is complete
        return ChatTokens(tokens, trained, offsets, truncated, dropped, skipped)


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item goes into the fullest row that still has room for it."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([int(i)])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(int(i))
            bisect.insort(free, (room - n, r))
    return rows


class ChatRows:
    """Training rows of max_seq_len positions holding whole conversations.

    Conversation c with ids x gives inputs x[:-1] and labels x[1:] (IGNORE where not trained).
    Packed (default): several conversations per row, each its own attention segment with positions
    restarting at 0, the rest of the row padding (its own segment, no loss). Unpacked: one
    conversation per row, right-padded, as upstream does. Both give the same loss on the same data.
    """

    def __init__(self, data: ChatTokens, seq_len: int, packed: bool = True, pad_id: int = 0):
        self.data, self.seq_len, self.pad_id = data, seq_len, pad_id
        lengths = np.diff(data.offsets) - 1
        self.rows = pack(lengths, seq_len) if packed else [[i] for i in range(len(data))]
        self.useful = int(lengths.sum())

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fill(self) -> float:
        """Share of row positions that hold conversation tokens (1.0 = no padding)."""
        return self.useful / (len(self.rows) * self.seq_len)

    def batch(self, rows: np.ndarray) -> Batch:
        B, T = len(rows), self.seq_len
        inputs = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        segments = np.zeros((B, T), dtype=np.int64)
        for b, r in enumerate(rows):
            at = 0
            for s, c in enumerate(self.rows[int(r)]):
                ids, trained = self.data.conversation(c)
                n = len(ids) - 1
                inputs[b, at : at + n] = ids[:-1]
                labels[b, at : at + n] = np.where(trained[1:], ids[1:], IGNORE)
                segments[b, at : at + n] = s
                at += n
            segments[b, at:] = len(self.rows[int(r)])
        return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(segments))


def show_mask(tokenizer: Tokenizer, ids: np.ndarray, trained: np.ndarray, color: bool = False) -> str:
    """The rendered conversation with trained tokens marked: [[...]] (or green on a terminal)."""
    out, run, state = [], [], bool(trained[0]) if len(trained) else False

    def close() -> None:
        text = tokenizer.decode(run)
        if state:
            text = f"\033[32m{text}\033[0m" if color else f"[[{text}]]"
        out.append(text)

    for t, m in zip(ids.tolist(), trained.tolist()):
        if m != state and run:
            close()
            run = []
        state = m
        run.append(t)
    if run:
        close()
    return "".join(out)
