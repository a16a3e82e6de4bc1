"""Preference pairs for DPO and the reward model: validation, ChatML ids, and rows of (chosen, rejected).

Accepted lines (JSONL):

    {"chosen": [messages], "rejected": [messages]}       upstream's dpo.jsonl: two whole conversations
    {"prompt": "text", "chosen": "text", "rejected": "text"}     the prompt is one user turn
    {"prompt": [messages], "chosen": [messages] | "text", ...}   prompt turns + the replies

Both sides must pass `check_messages`, end with an assistant reply, and share every turn before it
(the prompt); otherwise `DataError: FILE:LINE: reason`. Only the *final* reply is compared: earlier
assistant turns belong to the shared prompt and are never trained.

Each side is tokenized exactly as SFT tokenizes a conversation (`encode_conversations`), so the
reply's ids are those the model produces after `<|im_start|>assistant\\n`. Too long: DPO keeps the
prompt whole and cuts the replies' ends at the row (their log-probs cover the part that fits);
the reward model scores the closing `<|im_end|>`, so it drops a pair that does not fit whole. A
pair whose prompt leaves no room for a reply is dropped. Both are counted and reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.data.batch import IGNORE, Batch
from minimind.data.cache import Columns, Meter, Skipped, cached, pipelined
from minimind.data.chat import assemble, message_texts
from minimind.data.messages import check_messages
from minimind.data.readers import iter_checked
from minimind.data.tokens import batched, offsets_of, token_dtype
from minimind.errors import DataError
from minimind.tokenizer import Tokenizer

BATCH = 1024
FORMS = '{"chosen": [messages], "rejected": [messages]} or {"prompt": ..., "chosen": ..., "rejected": ...}'


def check_pair(obj: dict[str, Any], where: str) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) as whole validated conversations, or DataError naming `where`."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: missing '{key}' (expected {FORMS})")
    sides = [obj["chosen"], obj["rejected"]]
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}: 'prompt' is empty")
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise DataError(f"{where}: 'prompt' is a {type(prompt).__name__}, not a string or a list of messages")
        sides = [prompt + ([{"role": "assistant", "content": s}] if isinstance(s, str) else s) for s in sides]
    for key, side in zip(("chosen", "rejected"), sides):
        if not isinstance(side, list):
            why = "a list of messages (or a string, with 'prompt')"
            raise DataError(f"{where}: '{key}' is a {type(side).__name__}, not {why}")
    chosen, rejected = (check_messages(s, f"{where}: {k}", key=k) for k, s in zip(("chosen", "rejected"), sides))
    if chosen[:-1] != rejected[:-1]:
        k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise DataError(
            f"{where}: chosen and rejected must share the same prompt (every turn before the last reply); "
            f"message {k + 1} differs"
        )
    return chosen, rejected


def iter_pairs(
    paths: list[str | Path], skipped: list[str] | None = None, meter: Meter | None = None
) -> Iterator[tuple[list[dict], list[dict]]]:
    """Validated (chosen, rejected) conversations; bad lines raise, or are counted in `skipped`."""
    return iter_checked(paths, check_pair, "preference pairs", skipped, meter)


@dataclass
class PreferenceData:
    """Token ids of every pair: sequence 2i is pair i's chosen conversation, 2i + 1 its rejected one."""

    tokens: np.ndarray  # flat ids of all sequences
    offsets: np.ndarray  # int64, 2 * pairs + 1
    reply_start: np.ndarray  # int64 per sequence: index of the final reply's first id (after its header)
    truncated: int = 0  # pairs whose replies were cut at the row's end
    dropped: int = 0  # pairs that did not fit
    skipped: Skipped = field(default_factory=Skipped)

    def __len__(self) -> int:
        return len(self.reply_start) // 2

    def sequence(self, k: int) -> tuple[np.ndarray, int]:
        return np.asarray(self.tokens[self.offsets[k] : self.offsets[k + 1]], dtype=np.int64), int(self.reply_start[k])

    def report(self) -> str:
        lengths = np.diff(self.offsets)
        reply = int((lengths - self.reply_start).sum())
        parts = [f"{len(self):,} pairs, {int(lengths.sum()):,} tokens ({reply:,} in the compared replies)"]
        if self.truncated:
            parts.append(f"{self.truncated:,} with replies cut at the row's end")
        if self.dropped:
            parts.append(f"{self.dropped:,} dropped (longer than the row)")
        if self.skipped.count:
            parts.append(f"{self.skipped.count:,} bad lines skipped")
        return ", ".join(parts)


def encode_pairs(
    tokenizer: Tokenizer,
    pairs: list[tuple[list[dict], list[dict]]],
    max_len: int,
    cut_replies: bool,
    bodies: list[list[int]] | None = None,
) -> list[tuple[np.ndarray, int, np.ndarray, int, bool] | None]:
    """Per pair (chosen ids, reply start, rejected ids, reply start, was cut), or None when it does not
    fit in `max_len` ids: with `cut_replies`, when the prompt leaves no room for a reply id; else
    when either conversation is longer. `bodies`: the sides' messages already encoded, if they are."""
    sides = [side for pair in pairs for side in pair]
    if bodies is None:
        bodies = tokenizer.encode_batch(message_texts(sides))
    encoded = assemble(tokenizer, sides, bodies).items()
    out: list[tuple[np.ndarray, int, np.ndarray, int, bool] | None] = []
    for k in range(0, len(encoded), 2):
        sides = []
        for ids, trained, _ in encoded[k : k + 2]:  # type: ignore[misc]
            start = len(ids) - int(np.argmin(trained[::-1]))  # the trailing trained run is the final reply
            sides.append((ids, start))
        if any(len(ids) > max_len and not (cut_replies and start < max_len) for ids, start in sides):
            out.append(None)
            continue
        cut = any(len(ids) > max_len for ids, _ in sides)
        (c, cs), (r, rs) = ((ids[:max_len], start) for ids, start in sides)
        out.append((c, cs, r, rs, cut))
    return out


def read_preferences(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    max_len: int,
    cut_replies: bool = True,
    skip_bad_lines: bool = False,
    cache_dir: str | Path | None = None,
) -> PreferenceData:
    """Every pair of the files, tokenized once into a cache (streamed, see minimind.data.cache);
    sequences of at most `max_len` ids (see encode_pairs)."""
    dtype = token_dtype(tokenizer)

    def build(columns: Columns, meter: Meter, bar: Any) -> dict[str, Any]:
        skipped = Skipped()
        counts = {"records": 0, "truncated": 0, "dropped": 0}
        batches = batched(iter_pairs(paths, skipped if skip_bad_lines else None, meter), BATCH)
        texts = lambda batch: tokenizer.encode_batch(message_texts([side for pair in batch for side in pair]))
        for batch, bodies in pipelined(batches, texts):
            kept = [item for item in encode_pairs(tokenizer, batch, max_len, cut_replies, bodies) if item is not None]
            counts["dropped"] += len(batch) - len(kept)
            counts["truncated"] += sum(item[4] for item in kept)
            counts["records"] += len(kept)
            if kept:
                seqs = [seq for c, _, r, _, _ in kept for seq in (c, r)]
                columns.write(**{".bin": np.concatenate(seqs)})
                columns.add_records(
                    lengths=[len(q) for q in seqs], starts=[x for _, cs, _, rs, _ in kept for x in (cs, rs)]
                )
            bar.update(meter.bytes - bar.n)
            bar.set_postfix_str(f"{counts['records']:,} pairs, {columns.count / 1e6:.1f}M tokens", refresh=False)
        if not counts["records"]:
            raise DataError(f"{paths[0]}: no preference pair fits in {max_len} tokens (raise --max-seq-len)")
        arrays = {".idx.npy": offsets_of(columns.record("lengths")), ".start.npy": columns.record("starts")}
        return {"arrays": arrays, "skipped": skipped, **counts}

    params = {"version": 1, "max_len": max_len, "cut_replies": cut_replies, "skip_bad_lines": skip_bad_lines}
    entry = cached("pairs", params, paths, tokenizer, {".bin": dtype}, build, cache_dir)
    meta = entry.meta
    return PreferenceData(
        entry.memmap(".bin", dtype),
        entry.load(".idx.npy"),
        entry.load(".start.npy"),
        meta["truncated"],
        meta["dropped"],
        entry.skipped,
    )


@dataclass
class PairBatch(Batch):
    """2B sequences, right-padded: the B chosen, then the B rejected. The loss is averaged over pairs;
    throughput counts the real (unpadded) tokens of both sides.

    shifted rows (DPO): inputs ids[:-1], labels ids[1:] on the final reply only, IGNORE elsewhere.
    whole rows (reward model): inputs are the ids; `lengths` - 1 indexes each closing <|im_end|>.
    """

    ref_logps: torch.Tensor | None = None  # (2B,) reference log-probs, when precomputed
    lengths: torch.Tensor | None = None  # (2B,) real (unpadded) positions per row

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def loss_units(self) -> float:
        return self.pairs

    @property
    def num_tokens(self) -> int:
        assert self.lengths is not None
        return int(self.lengths.sum())

    def to(self, device: torch.device) -> PairBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return PairBatch(
            move(self.input_ids), move(self.labels), move(self.segment_ids), move(self.ref_logps), move(self.lengths)
        )


class PairRows:
    """Row i is pair `index[i]`; a batch is padded to its longest sequence, rounded up to a multiple
    of 8 (at most seq_len), so short pairs cost little and shapes stay few.

    Right padding needs no attention mask: under causal attention no real position sees a pad.
    `ref_logps` (rows, 2), when set (DPO --precompute-ref), rides along in every batch.
    """

    def __init__(
        self, data: PreferenceData, seq_len: int, pad_id: int, shifted: bool = True, index: np.ndarray | None = None
    ):
        self.data, self.seq_len, self.pad_id, self.shifted = data, seq_len, pad_id, shifted
        self.index = np.arange(len(data)) if index is None else np.asarray(index, dtype=np.int64)
        self.ref_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, rows: np.ndarray) -> PairBatch:
        rows = np.asarray(rows, dtype=np.int64)
        pairs = self.index[rows]
        seqs = [(self.data.sequence(2 * p), self.data.sequence(2 * p + 1)) for p in pairs]
        seqs = [s[0] for s in seqs] + [s[1] for s in seqs]
        cut = 1 if self.shifted else 0
        longest = max(len(ids) - cut for ids, _ in seqs)
        T = min(self.seq_len, -(-longest // 8) * 8)
        inputs = np.full((len(seqs), T), self.pad_id, dtype=np.int64)
        labels = np.full((len(seqs), T), IGNORE, dtype=np.int64)
        lengths = np.zeros(len(seqs), dtype=np.int64)
        for j, (ids, start) in enumerate(seqs):
            n = len(ids) - cut
            inputs[j, :n] = ids[:n]
            if self.shifted:  # label t is id t + 1; the reply's ids are labels start - 1 ...
                labels[j, start - 1 : n] = ids[start:]
            lengths[j] = n
        ref = None
        if self.ref_logps is not None:
            ref = self.ref_logps[torch.from_numpy(rows)].T.reshape(-1)  # chosen..., rejected...
        return PairBatch(torch.from_numpy(inputs), torch.from_numpy(labels), None, ref, torch.from_numpy(lengths))

    def split(self, fraction: float, seed: int) -> tuple[PairRows, PairRows]:
        """(train, held out): a seeded `fraction` of the pairs held out, at least one each side."""
        order = np.random.default_rng([seed, 7]).permutation(self.index)
        k = min(max(1, round(len(order) * fraction)), len(order) - 1)
        if k < 1:
            raise DataError(f"only {len(order)} pair(s): too few to hold any out")
        make = lambda idx: PairRows(self.data, self.seq_len, self.pad_id, self.shifted, np.sort(idx))
        return make(order[k:]), make(order[:k])
