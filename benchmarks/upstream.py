"""Measure upstream MiniMind (jingyaogong/minimind) speed on CPU: pretraining throughput and decode speed.

Upstream is never imported into this project: its checkout (e.g. ``/tmp/upstream-minimind``) is run
as-is in child processes under ``--python`` (an interpreter with upstream's dependencies, e.g. a venv
with torch 2.13 CPU + transformers 4.57.1 + pandas + scikit-learn).

a) Pretraining: runs upstream's own ``trainer/train_pretrain.py`` (minimind2-small: hidden 512,
   8 layers, max_seq_len 512, batch 8, fp32 because upstream uses no autocast on CPU) on the first
   ``(warmup + steps) * batch`` documents of ``--data``, so one epoch is exactly that many optimizer
   steps (``--accumulation_steps 1``). The whole process is timed end to end (interpreter start,
   imports, model init, on-the-fly tokenization in its DataLoader, the checkpoint it always saves at
   step ``iters - 1``). Useful tokens are the non-pad tokens of the samples it consumed: upstream pads
   every document to ``max_seq_len`` and truncates longer ones, so each doc contributes
   ``min(len, max_seq_len)``. Per-step rates come from timestamps of its per-step log lines.
b) Decode: random-init ``MiniMindForCausalLM`` (same config), greedy ``model.generate`` of
   ``--new-tokens`` tokens at batch 1 from ``bos + prompt`` as its ``eval_llm.py`` does for pretrain
   weights, with EOS disabled so the full length is generated.

Prints one JSON object on stdout (figures and exact commands), then a human summary on stderr.

Usage::

    /tmp/upstream-venv/bin/python benchmarks/upstream.py --upstream /tmp/upstream-minimind \\
        --data /tmp/bench_corpus.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOG_RE = re.compile(r"Epoch:\[\d+/\d+\]\((\d+)/(\d+)\) loss:(\S+)")


def busy_cpu_s() -> float:
    """CPU seconds spent busy so far by the whole machine (all cores, all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used by this process and its finished children."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def wait_idle(max_wait_s: float, busy_cores: float = 0.3) -> float:
    """Wait until the machine is idle (< ``busy_cores`` busy over 2 s) so runs do not share cores; returns s waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        b0 = busy_cpu_s()
        time.sleep(2.0)
        if (busy_cpu_s() - b0) / 2.0 < busy_cores:
            break
    return round(time.perf_counter() - t0, 1)


def measured(fn: Any, args: argparse.Namespace, *fn_args: Any) -> dict[str, Any]:
    """Run ``fn`` on an idle machine; retry while other processes took > 0.2 cores during the run."""
    out: dict[str, Any] = {}
    for attempt in range(1, args.attempts + 1):
        waited = wait_idle(args.idle_wait)
        b0, o0, t0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
        out = fn(args, *fn_args)
        foreign = (busy_cpu_s() - b0) - (own_cpu_s() - o0)
        out["contention"] = {
            "attempt": attempt,
            "waited_for_idle_s": waited,
            "foreign_cpu_cores": round(max(foreign, 0.0) / (time.perf_counter() - t0), 3),
        }
        out["contention"]["contended"] = out["contention"]["foreign_cpu_cores"] > 0.2
        if not out["contention"]["contended"] or attempt == args.attempts:
            break
        print(
            f"contended run (other processes used {out['contention']['foreign_cpu_cores']} cores), retrying",
            file=sys.stderr,
        )
    return out


def thread_env(threads: int) -> dict[str, str]:
    """Environment for child processes: fixed thread counts, unbuffered output, offline HF."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return env


def bench_pretrain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run upstream's train_pretrain.py end to end and derive useful-token throughput."""
    from tokenizers import Tokenizer

    upstream = Path(args.upstream).resolve()
    n_steps = args.warmup + args.steps
    n_docs = n_steps * args.batch_size
    with open(args.data, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:n_docs]
    if len(lines) < n_docs:
        raise SystemExit(f"--data has {len(lines)} docs, need {n_docs}")
    subset = work / "pretrain_subset.jsonl"
    subset.write_text("".join(lines), encoding="utf-8")

    tok = Tokenizer.from_file(str(upstream / "model" / "tokenizer.json"))
    texts = [str(json.loads(line)["text"]) for line in lines]
    lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
    seq = args.max_seq_len
    useful = sum(min(n, seq) for n in lengths)  # non-pad tokens of the padded samples
    targets = sum(max(min(n, seq) - 1, 0) for n in lengths)  # positions with loss_mask == 1
    positions = n_docs * (seq - 1)  # model input is input_ids[:-1]: 511 positions per sample

    cmd = [
        args.python, "train_pretrain.py",
        "--data_path", str(subset),
        "--batch_size", str(args.batch_size),
        "--accumulation_steps", "1",
        "--max_seq_len", str(seq),
        "--hidden_size", "512",
        "--num_hidden_layers", "8",
        "--epochs", "1",
        "--device", "cpu",
        "--dtype", "float32",
        "--num_workers", str(args.num_workers),
        "--log_interval", "1",
        "--save_dir", str(work / "out"),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=upstream / "trainer",
        env=thread_env(args.threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        tail = (tail + [line.rstrip()])[-20:]
        m = LOG_RE.search(line)
        if m:
            stamps[int(m.group(1))] = now
            losses[int(m.group(1))] = float(m.group(3))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0 or len(stamps) != n_steps:
        raise SystemExit(f"train_pretrain.py failed (rc={rc}, {len(stamps)}/{n_steps} steps):\n" + "\n".join(tail))

    per_step = useful / n_steps
    # Steady-state window: after the warm-up steps, up to the step before the checkpoint save
    # (upstream saves after logging step iters - 1, so the last interval includes the save).
    first, last = args.warmup, n_steps - 1
    dts = [stamps[k] - stamps[k - 1] for k in range(first + 1, last + 1)]
    steady = stamps[last] - stamps[first]
    return {
        "command": shlex.join(cmd),
        "cwd": str(upstream / "trainer"),
        "data_path_is": f"the first {n_docs} lines of {args.data} (temporary copy)",
        "env": f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} PYTHONUNBUFFERED=1",
        "optimizer_steps": n_steps,
        "docs": n_docs,
        "useful_tokens": useful,
        "loss_target_tokens": targets,
        "padded_positions": positions,
        "padding_share": round(1 - useful / (n_docs * seq), 4),
        "wall_s": round(wall, 2),
        "startup_s_to_first_step_log": round(stamps[1], 2),
        "end_to_end_useful_tok_per_s": round(useful / wall, 1),
        "end_to_end_padded_tok_per_s": round(positions / wall, 1),
        "steady_steps": f"{first + 1}..{last}",
        "steady_step_s_mean": round(steady / len(dts), 3),
        "steady_step_s_median": round(statistics.median(dts), 3),
        "steady_useful_tok_per_s": round(per_step * len(dts) / steady, 1),
        "steady_padded_tok_per_s": round(args.batch_size * (seq - 1) * len(dts) / steady, 1),
        "last_step_incl_checkpoint_save_s": round(stamps[n_steps] - stamps[n_steps - 1], 2),
        "loss_first_last": [losses[1], losses[n_steps]],
    }


def decode_worker(args: argparse.Namespace) -> None:
    """Child process: time upstream's HF ``generate`` (greedy, batch 1) and print a JSON line."""
    import torch

    sys.path.insert(0, str(Path(args.upstream).resolve()))
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(Path(args.upstream) / "model"))
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=512, num_hidden_layers=8)).eval()
    inputs = tokenizer(tokenizer.bos_token + args.prompt, return_tensors="pt")
    seen: list[int] = []
    model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)

    def generate(n: int) -> tuple[float, int]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                inputs=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=n,
                min_new_tokens=0,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
        return time.perf_counter() - t, out.shape[1] - inputs["input_ids"].shape[1]

    generate(16)  # warm-up
    times = []
    for _ in range(args.decode_repeats):
        seen.clear()
        dt, made = generate(args.new_tokens)
        if made != args.new_tokens:
            raise SystemExit(f"generated {made} tokens, expected {args.new_tokens}")
        times.append(dt)
    print(
        json.dumps(
            {
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "new_tokens": args.new_tokens,
                "repeats_s": [round(t, 3) for t in times],
                "tok_per_s_median": round(args.new_tokens / statistics.median(times), 1),
                "tok_per_s_best": round(args.new_tokens / min(times), 1),
                "forward_calls": len(seen),
                "kv_cache_used": len(seen) == args.new_tokens and all(n == 1 for n in seen[1:]),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
            }
        )
    )


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`decode_worker` under ``--python`` and return its figures plus the command."""
    cmd = [
        args.python, str(Path(__file__).resolve()), "--decode-worker",
        "--upstream", str(Path(args.upstream).resolve()), "--threads", str(args.threads),
        "--new-tokens", str(args.new_tokens), "--decode-repeats", str(args.decode_repeats), "--prompt", args.prompt,
    ]  # fmt: skip
    res = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit("decode worker failed:\n" + res.stdout[-3000:] + res.stderr[-3000:])
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    out["command"] = shlex.join(cmd)
    out["how"] = "model.generate(do_sample=False, eos_token_id=None), batch 1, bos + prompt as eval_llm.py"
    return out


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default="/tmp/upstream-minimind", help="upstream checkout (commit 0323815)")
    ap.add_argument("--data", help="JSONL corpus from benchmarks/make_corpus.py")
    ap.add_argument("--python", default=sys.executable, help="interpreter with upstream's dependencies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2, help="warm-up optimizer steps (inside the timed run)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps after warm-up")
    ap.add_argument("--num-workers", type=int, default=1, help="upstream --num_workers (its default is 1)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--prompt", default="你有什么特长？", help="decode prompt (eval_llm.py's first prompt)")
    ap.add_argument("--idle-wait", type=float, default=900, help="max s to wait for other jobs to finish first")
    ap.add_argument("--attempts", type=int, default=3, help="re-run a measurement disturbed by other processes")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--decode-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.decode_worker:
        decode_worker(args)
        return

    upstream = Path(args.upstream)
    commit = subprocess.run(
        ["git", "--git-dir", "/work/.mirror/jingyaogong+minimind/repo", "rev-parse", "0323815"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    result: dict[str, Any] = {
        "upstream": str(upstream.resolve()),
        "upstream_commit": commit or "0323815 (mirror not found)",
        "python": args.python,
        "threads": args.threads,
        "config": {
            "hidden_size": 512,
            "num_hidden_layers": 8,
            "max_seq_len": args.max_seq_len,
            "batch_size": args.batch_size,
            "dtype": "float32",
        },
    }
    if not args.skip_train:
        if not args.data:
            raise SystemExit("--data is required unless --skip-train")
        with tempfile.TemporaryDirectory(prefix="upstream-bench-") as tmp:
            result["pretrain"] = measured(bench_pretrain, args, Path(tmp))
    if not args.skip_decode:
        result["decode"] = measured(bench_decode, args)
    print(json.dumps(result, indent=1, ensure_ascii=False))

    lines = [f"upstream MiniMind {result['upstream_commit'][:7]} on CPU, {args.threads} threads, fp32"]
    if "pretrain" in result:
        p = result["pretrain"]
        lines += [
            f"  pretrain: {p['optimizer_steps']} steps x {args.batch_size} docs @ {args.max_seq_len} "
            f"in {p['wall_s']} s (first step logged at {p['startup_s_to_first_step_log']} s), "
            f"padding {p['padding_share']:.1%}",
            f"    end-to-end: {p['end_to_end_useful_tok_per_s']} useful tok/s "
            f"({p['end_to_end_padded_tok_per_s']} padded)",
            f"    steady steps {p['steady_steps']}: {p['steady_useful_tok_per_s']} useful tok/s "
            f"({p['steady_padded_tok_per_s']} padded), {p['steady_step_s_median']} s/step median",
        ]
    if "decode" in result:
        d = result["decode"]
        lines.append(
            f"  decode: {d['new_tokens']} new tokens, batch 1, greedy: {d['tok_per_s_median']} tok/s median "
            f"(best {d['tok_per_s_best']}), kv cache used: {d['kv_cache_used']}"
        )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
