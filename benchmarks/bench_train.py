"""Our side of the speed benchmark: pretraining throughput in useful tokens/s, and decode tokens/s.

a) Pretraining: runs `minimind pretrain` in a child process exactly as a user would, with a fresh
   token cache (so tokenizing the corpus is part of the measured time), and times the whole process
   end to end. Every trained token is useful (rows are packed, no padding), so useful tokens =
   steps x batch x max_seq_len. The steady-state rate comes from metrics.jsonl (first window dropped).
b) Decode: greedy generation of `--new-tokens` tokens at batch 1 with the KV-cached engine, from
   the run just trained (same random-ish weights as upstream's figure uses: speed does not depend on them).

Usage:
    .venv/bin/python benchmarks/bench_train.py --data CORPUS.jsonl --tokenizer TOKENIZER_DIR \
        [--preset minimind2-small --max-seq-len 512 --batch-size 8 --steps 20 --device cpu --dtype auto]

Prints one JSON object (figures and the exact command) on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pretrain(args: argparse.Namespace, work: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "minimind",
        "pretrain",
        "--data",
        args.data,
        "--tokenizer",
        args.tokenizer,
        "--preset",
        args.preset,
        "--out",
        str(work / "run"),
        "--max-seq-len",
        str(args.max_seq_len),
        "--batch-size",
        str(args.batch_size),
        "--accumulation",
        "1",
        "--max-steps",
        str(args.steps),
        "--log-every",
        "2",
        "--cache-dir",
        str(work / "cache"),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        *(["--compile"] if args.compile else []),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    useful = args.steps * args.batch_size * args.max_seq_len
    steady = [r["tokens_per_s"] for r in records[1:]] or [records[-1]["tokens_per_s"]]
    out = {
        "command": " ".join(cmd[1:]),
        "wall_s": round(seconds, 2),
        "useful_tokens": useful,
        "useful_tokens_per_s_whole_run": round(useful / seconds, 1),
        "tokens_per_s_steady_median": round(statistics.median(steady), 1),
    }
    if "mfu" in records[-1]:
        out["mfu_steady_median"] = statistics.median(r.get("mfu", 0) for r in records[1:] or records)
    return out


def decode(args: argparse.Namespace, run_dir: Path) -> dict:
    import torch

    from minimind.checkpoint import load_run
    from minimind.generate import SamplingParams, generate
    from minimind.inference import resolve_device

    run = load_run(run_dir, device=resolve_device(args.device))
    if args.dtype == "bfloat16" or (args.dtype == "auto" and run.model.embed_tokens.weight.is_cuda):
        run.model.to(torch.bfloat16)
    prompt = [run.tokenizer.bos_id] + run.tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    generate(run.model, [prompt], SamplingParams(max_new_tokens=16, temperature=0))  # warm-up
    rates = [generate(run.model, [prompt], params).decode_tokens_per_s for _ in range(3)]
    return {"new_tokens": args.new_tokens, "batch": 1, "decode_tokens_per_s_median": round(statistics.median(rates), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--preset", default="minimind2-small")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--decode-only", action="store_true", help="skip pretraining; decode from a fresh `minimind init` run"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.decode_only:
            cmd = [
                sys.executable,
                "-m",
                "minimind",
                "init",
                "--preset",
                args.preset,
                "--tokenizer",
                args.tokenizer,
                "--out",
                str(work / "run"),
            ]
            subprocess.run(cmd, check=True, capture_output=True)
            result = {"preset": args.preset, "dtype": args.dtype, "decode": decode(args, work / "run")}
        else:
            result = {"preset": args.preset, "pretrain": pretrain(args, work), "decode": decode(args, work / "run")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
