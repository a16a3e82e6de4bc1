"""Conversations for SFT and every stage after it: validation, ChatML ids with a loss mask,
truncation, and rows that pack several conversations with attention kept inside each.

A conversation renders as ChatML, exactly what the tokenizer's chat template produces:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>

(the newline after the last `<|im_end|>` is dropped: nothing is learned from it). A token is
*trained* when it lies inside an assistant reply or is that reply's closing `<|im_end|>`: the
model learns to write replies and to end them, never to write the user's text, the system prompt
or the `<|im_start|>assistant\\n` header. Every assistant turn of a multi-turn conversation is trained.
Tools, tool calls, tool results and reasoning are rendered first (minimind/data/messages.py checks
them, minimind/toolcalls.py writes them): a reply's `<think>` block and `<tool_call>` lines are part
of the reply and trained; tool results come back as a user turn and are not.

Truncation: a conversation longer than the row (max_seq_len + 1 tokens) loses whole later turns,
cut after the last assistant reply that still fits, so no reply is left without its end; one whose
first reply does not fit is dropped. Both are counted and reported.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.chatformat import THINK_OPEN
from minimind.data.batch import IGNORE, Batch
from minimind.data.cache import Columns, Meter, Skipped, cached, pipelined, progress
from minimind.data.messages import check_messages, parse_conversation
from minimind.data.readers import iter_checked
from minimind.data.tokens import batched, offsets_of, token_dtype
from minimind.errors import DataError
from minimind.tokenizer import BOS, EOS, Tokenizer

ROLES = ("system", "user", "assistant")  # of the ChatML messages assembled (tool results are user turns)
CHAT_CACHE_VERSION = 5
BATCH = 1024


def render(messages: list[dict]) -> str:
    """The conversation as ChatML text (what the chat template writes, minus the final newline)."""
    return "\n".join(f"{BOS}{m['role']}\n{m['content']}{EOS}" for m in messages)


def message_texts(conversations: list[list[dict]]) -> list[str]:
    """Every message's content, in order: what the tokenizer encodes for `assemble`."""
    return [m["content"] for c in conversations for m in c]


@dataclass
class Assembled:
    """A batch of conversations as flat arrays: the kept ones' ids and trained flags end to end."""

    ids: np.ndarray
    trained: np.ndarray
    lengths: np.ndarray  # int64 per kept conversation
    kept: np.ndarray  # bool per conversation: False when not even its first reply fits
    cut: np.ndarray  # bool per conversation: lost later turns

    def items(self) -> list[tuple[np.ndarray, np.ndarray, bool] | None]:
        """Per conversation (ids, trained, was cut), or None when dropped."""
        ends = np.cumsum(self.lengths)
        ids, trained = np.split(self.ids, ends[:-1]), np.split(self.trained, ends[:-1])
        pieces = iter(zip(ids, trained))
        return [(*next(pieces), bool(c)) if k else None for k, c in zip(self.kept, self.cut)]


def assemble(
    tokenizer: Tokenizer,
    conversations: list[list[dict]],
    bodies: list[list[int]],
    max_len: int | None = None,
    dtype: type = np.int64,
) -> Assembled:
    """The batch's ChatML ids and trained flags from its messages' encoded contents (`bodies`, in
    `message_texts` order), each conversation cut to at most `max_len` ids at a reply's end.

    Message j is [newline if j > 0] + `<|im_start|>role\n` + body + `<|im_end|>`, trained on its
    body and `<|im_end|>` when the role is assistant. Only the per-message bookkeeping (which
    messages are kept) is a Python loop; ids and flags are laid out with whole-array operations.
    """
    newline = tokenizer.encode("\n")
    # Head variants: ROLES[v] for a first message (v < 3), ROLES[v - 3] after a newline (v >= 3).
    heads = [np.asarray(nl + tokenizer.encode(f"{BOS}{r}\n")) for nl in ([], newline) for r in ROLES]
    head_len = [len(h) for h in heads]
    body_len = np.fromiter(map(len, bodies), dtype=np.int64, count=len(bodies))
    keep_msg = np.zeros(len(bodies), dtype=bool)
    variant, assistant, kept, cut = [], [], [], []
    m = 0
    for conversation in conversations:
        total, j_fit = 0, -1  # j_fit: the last assistant message that ends within max_len
        for j, msg in enumerate(conversation):
            v = ROLES.index(msg["role"]) + (3 if j else 0)
            total += head_len[v] + int(body_len[m + j]) + 1
            if msg["role"] == "assistant" and (max_len is None or total <= max_len):
                j_fit = j
        was_cut = max_len is not None and total > max_len
        keep = j_fit + 1 if was_cut else len(conversation)
        kept.append(keep > 0)
        cut.append(was_cut and keep > 0)
        keep_msg[m : m + keep] = True
        for msg, j in zip(conversation[:keep], range(keep)):
            variant.append(ROLES.index(msg["role"]) + (3 if j else 0))
            assistant.append(msg["role"] == "assistant")
        m += len(conversation)
    variant_a = np.asarray(variant, dtype=np.int64)
    hl = np.asarray(head_len, dtype=np.int64)[variant_a] if len(variant) else np.zeros(0, dtype=np.int64)
    bl = body_len[keep_msg] + 1  # the body and its <|im_end|>
    seg = np.stack([hl, bl], axis=1).ravel()
    flags = np.stack([np.zeros(len(bl), dtype=bool), np.asarray(assistant, dtype=bool)], axis=1).ravel()
    trained = np.repeat(flags, seg)
    ids = np.empty(len(trained), dtype=dtype)
    starts = np.cumsum(hl + bl) - hl - bl
    for v, head in enumerate(heads):
        at = starts[variant_a == v]
        ids[at[:, None] + np.arange(len(head))] = head
    flat = np.fromiter(itertools.chain.from_iterable(bodies), dtype=dtype, count=int(body_len.sum()))
    kept_bodies = flat[np.repeat(keep_msg, body_len)]
    in_body = np.repeat(np.tile(np.array([False, True]), len(bl)), seg)
    ids[in_body] = np.insert(kept_bodies, np.cumsum(bl - 1), tokenizer.eos_id)
    # Per kept conversation: the sum of its kept messages' lengths.
    conv_of_msg = np.repeat(np.arange(len(conversations)), [len(c) for c in conversations])[keep_msg]
    lengths = np.bincount(conv_of_msg, weights=hl + bl, minlength=len(conversations)).astype(np.int64)
    kept_a = np.asarray(kept, dtype=bool)
    return Assembled(ids, trained, lengths[kept_a], kept_a, np.asarray(cut, dtype=bool))


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
    bodies = tokenizer.encode_batch(message_texts(conversations))
    return assemble(tokenizer, conversations, bodies, max_len).items()


def conversation_of(obj: dict[str, Any], where: str) -> list[dict]:
    """The checked messages of one SFT record, as plain ChatML (tools, calls and results rendered)."""
    if "conversations" not in obj:
        raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [...]}})")
    return check_messages(obj["conversations"], where)


PHI = 0.6180339887498949  # the golden ratio's fraction: k * PHI mod 1 spreads evenly over [0, 1)


def with_empty_think(ratio: float) -> Callable[[dict[str, Any], str], list[dict]]:
    """`conversation_of` that gives a share `ratio` of the conversations an empty `<think>` block in
    front of each assistant reply that has no reasoning (and none in its text): the block that
    `enable_thinking=False` writes in the prompt, so one model learns to answer with and without it
    (upstream's SFT keeps the block on 20% of conversations). Conversation k is chosen when
    frac(k * PHI) < ratio: deterministic, so the token cache stays valid, and evenly spread."""
    count = itertools.count(1)

    def check(obj: dict[str, Any], where: str) -> list[dict]:
        if "conversations" not in obj:
            raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [...]}})")
        conv = parse_conversation(obj["conversations"], where)
        if (next(count) * PHI) % 1.0 < ratio:
            for m in conv.messages:
                if m["role"] == "assistant" and "reasoning_content" not in m and THINK_OPEN not in m["content"]:
                    m["reasoning_content"] = ""
        return conv.chatml()

    return check if ratio > 0 else conversation_of


def iter_conversations(
    paths: list[str | Path], skipped: list[str] | None = None, meter: Meter | None = None, empty_think: float = 0.0
) -> Iterator[list[dict]]:
    """Validated conversations of SFT-format JSONL files; bad lines raise, or are counted in `skipped`."""
    return iter_checked(paths, with_empty_think(empty_think), "conversations", skipped, meter)


@dataclass
class ChatTokens:
    """Conversations as one flat token array, a trained mask beside it, and per-conversation offsets."""

    tokens: np.ndarray
    trained: np.ndarray  # bool per token: its label is learned
    offsets: np.ndarray  # int64, conversations + 1
    truncated: int = 0  # conversations that lost later turns
    dropped: int = 0  # conversations whose first reply did not fit
    skipped: Skipped = field(default_factory=Skipped)
    reused: bool = False
    trained_tokens: int | None = None  # from the cache's metadata: no pass over the mask to count them

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.trained[a:b])

    @property
    def num_trained(self) -> int:
        return int(self.trained.sum()) if self.trained_tokens is None else self.trained_tokens

    def report(self) -> str:
        parts = [f"{len(self):,} conversations, {int(self.offsets[-1]):,} tokens ({self.num_trained:,} trained)"]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated to their last whole reply")
        if self.dropped:
            parts.append(f"{self.dropped:,} dropped (first reply longer than the row)")
        if self.skipped:
            parts.append(f"{self.skipped.count:,} bad lines skipped")
        return ", ".join(parts)


def tokenize_conversations(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    max_seq_len: int,
    cache_dir: str | Path | None = None,
    skip_bad_lines: bool = False,
    empty_think: float = 0.0,
) -> ChatTokens:
    """Tokenize SFT files once (cached like pretraining tokens, keyed also by max_seq_len), streaming:
    memory stays flat in the file's size (see minimind.data.cache)."""
    dtype = token_dtype(tokenizer)

    def build(columns: Columns, meter: Meter, bar: Any) -> dict[str, Any]:
        skipped = Skipped()
        counts = {"records": 0, "truncated": 0, "dropped": 0, "trained": 0}
        batches = batched(iter_conversations(paths, skipped if skip_bad_lines else None, meter, empty_think), BATCH)
        for batch, bodies in pipelined(batches, lambda b: tokenizer.encode_batch(message_texts(b))):
            out = assemble(tokenizer, batch, bodies, max_seq_len + 1, dtype)
            counts["dropped"] += int((~out.kept).sum())
            counts["truncated"] += int(out.cut.sum())
            counts["records"] += len(out.lengths)
            counts["trained"] += int(out.trained.sum())
            columns.write(**{".bin": out.ids, ".mask": out.trained})
            columns.add_records(lengths=out.lengths)
            bar.update(meter.bytes - bar.n)
            done = f"{counts['records']:,} conversations, {columns.count / 1e6:.1f}M tokens"
            bar.set_postfix_str(done, refresh=False)
        if not counts["records"]:
            raise DataError(f"{paths[0]}: no conversation fits in max_seq_len {max_seq_len}")
        return {"arrays": {".idx.npy": offsets_of(columns.record("lengths"))}, "skipped": skipped, **counts}

    params = {"version": CHAT_CACHE_VERSION, "max_seq_len": max_seq_len, "skip_bad_lines": skip_bad_lines}
    if empty_think:
        params["empty_think"] = empty_think
    entry = cached("chat", params, paths, tokenizer, {".bin": dtype, ".mask": bool}, build, cache_dir)
    meta = entry.meta
    return ChatTokens(
        entry.memmap(".bin", dtype),
        entry.memmap(".mask", bool),
        entry.load(".idx.npy"),
        meta["truncated"],
        meta["dropped"],
        entry.skipped,
        reused=entry.reused,
        trained_tokens=meta["trained"],
    )


PACK_WINDOW = 1 << 16  # conversations packed together (best-fit within each window)


def pack(
    lengths: np.ndarray, capacity: int, window: int = PACK_WINDOW, bar: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing within windows of `window` items (in file order): each item goes into the
    fullest row of its window that still has room for it. Returns (starts, items): row r holds items
    items[starts[r]:starts[r + 1]]. Windows keep the search short and the memory flat on millions of
    conversations; with ~65k conversations per window the rows come out as full as over the whole file."""
    sizes, items = [], []  # per window: each row's item count, the items row after row
    for w in range(0, len(lengths), window):
        part = lengths[w : w + window]
        rows: list[list[int]] = []
        free: list[tuple[int, int]] = []  # sorted (room left, row index)
        for i in np.argsort(-part, kind="stable"):
            n = int(part[i])
            k = bisect.bisect_left(free, (n, -1))
            if k == len(free):
                rows.append([w + int(i)])
                bisect.insort(free, (capacity - n, len(rows) - 1))
            else:
                room, r = free.pop(k)
                rows[r].append(w + int(i))
                bisect.insort(free, (room - n, r))
        sizes.append(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))
        items.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(part)))
        if bar is not None:
            bar.update(len(part))
    if not items:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return offsets_of(np.concatenate(sizes)), np.concatenate(items)


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
        if packed:
            with progress(len(lengths), "packing", unit=" conversations") as bar:
                self.starts, self.items = pack(lengths, seq_len, bar=bar)
        else:
            self.starts, self.items = np.arange(len(data) + 1), np.arange(len(data))
        self.useful = int(lengths.sum())

    def __len__(self) -> int:
        return len(self.starts) - 1

    def row(self, r: int) -> np.ndarray:
        """The conversations of row r, in the order they sit in it."""
        return self.items[self.starts[r] : self.starts[r + 1]]

    @property
    def fill(self) -> float:
        """Share of row positions that hold conversation tokens (1.0 = no padding)."""
        return self.useful / (len(self) * self.seq_len)

    def batch(self, rows: np.ndarray) -> Batch:
        B, T = len(rows), self.seq_len
        inputs = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        segments = np.zeros((B, T), dtype=np.int64)
        for b, r in enumerate(rows):
            at = 0
            row = self.row(int(r))
            for s, c in enumerate(row):
                ids, trained = self.data.conversation(c)
                n = len(ids) - 1
                inputs[b, at : at + n] = ids[:-1]
                labels[b, at : at + n] = np.where(trained[1:], ids[1:], IGNORE)
                segments[b, at : at + n] = s
                at += n
            segments[b, at:] = len(row)
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
