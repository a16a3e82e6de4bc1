"""RL rollout speed: generated tokens/s at batch 16 (2 prompts x 8 samples), ours vs upstream's generate.

Both sides: minimind2-small shape (hidden 512, 8 layers, vocab 6400), fp32, random weights (speed does
not depend on them), the same two prompts (ids from upstream's tokenizer), sampling at temperature 0.8,
`--new-tokens` tokens per row with no early stop. Upstream is what its trainer/train_grpo.py calls:
`model.generate(do_sample=True, temperature=0.8, num_return_sequences=8)` on left-padded prompts;
ours is `minimind.generate.generate` on the 16 rows (full distribution, per-token log-probs recorded),
as users get it (with the native decode kernels of minimind/native.py on x86-64 CPUs) and, for
comparison, with them switched off (torch's matmul and attention only).
Upstream runs in a child process under `--python` (a venv with its dependencies); it is never imported
into this project. `--repeats` rounds, each timing upstream, ours and ours without the kernels back to
back (after a warm-up), so that a noisy moment on a shared machine hits all three; the ratio reported
is the median of the per-round ratios.

    .venv/bin/python benchmarks/bench_rollout.py --upstream /tmp/upstream-minimind \\
        --python /tmp/upstream-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROMPTS = ["你有什么特长？", "请用一句话介绍一下长江。"]


def prompt_ids(upstream: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(upstream / "model" / "tokenizer.json"))
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    return [tok.encode(chat.format(p), add_special_tokens=False).ids for p in PROMPTS]


def our_runner(args: argparse.Namespace, ids: list[list[int]]) -> Callable[[bool], float]:
    """Build our model once; the returned function times one rollout (with or without the native kernels)."""
    import torch

    from minimind import native
    from minimind.config import preset
    from minimind.generate import SamplingParams, generate
    from minimind.model import MiniMind

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MiniMind(preset("minimind2-small")).eval()
    rows = [p for p in ids for _ in range(args.samples)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.8, top_p=1.0, top_k=0, seed=0)
    native.load()
    ready = native._state

    def run(use_native: bool) -> float:
        native._state = ready if use_native else "off"
        generate(model, rows, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=1.0, seed=0))  # warm-up
        t = time.perf_counter()
        out = generate(model, rows, params)
        dt = time.perf_counter() - t
        native._state = ready
        assert out.new_tokens == len(rows) * args.new_tokens
        return dt

    return run


def upstream_worker(args: argparse.Namespace) -> None:
    """Child process under upstream's interpreter: time its generate as train_grpo.py calls it."""
    import torch

    sys.path.insert(0, str(Path(args.upstream).resolve()))
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=512, num_hidden_layers=8)).eval()
    ids = json.loads(args.ids)
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])

    def run(n: int) -> tuple[float, int]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=True, temperature=0.8, num_return_sequences=args.samples,
                                 pad_token_id=0, eos_token_id=None)  # fmt: skip
        return time.perf_counter() - t, out.shape[0] * (out.shape[1] - width)

    run(8)
    times = []
    for _ in range(args.repeats):
        dt, made = run(args.new_tokens)
        assert made == len(ids) * args.samples * args.new_tokens, made
        times.append(dt)
    rows = len(ids) * args.samples
    print(json.dumps({"rows": rows, "repeats_s": [round(x, 3) for x in times],
                      "tok_per_s": round(rows * args.new_tokens / statistics.median(times), 1),
                      "transformers": __import__("transformers").__version__}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default="/tmp/upstream-minimind")
    ap.add_argument("--python", default="/tmp/upstream-venv/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (2 prompts)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the upstream worker: timed runs)")
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ids:
        return upstream_worker(args)
    ids = prompt_ids(Path(args.upstream))
    cmd = [args.python, __file__, "--upstream", args.upstream, "--threads", str(args.threads),
           "--samples", str(args.samples), "--new-tokens", str(args.new_tokens), "--repeats", "1",
           "--ids", json.dumps(ids)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    run_ours = our_runner(args, ids)
    times: dict[str, list[float]] = {"upstream": [], "ours": [], "ours_without_native_kernels": []}
    transformers_version = ""
    for _ in range(args.repeats):  # rounds: upstream, ours, ours without kernels, back to back
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit("upstream worker failed:\n" + res.stdout[-2000:] + res.stderr[-3000:])
        up = json.loads(res.stdout.strip().splitlines()[-1])
        transformers_version = up["transformers"]
        times["upstream"].append(up["repeats_s"][0])
        times["ours"].append(run_ours(True))
        times["ours_without_native_kernels"].append(run_ours(False))
    tokens = len(ids) * args.samples * args.new_tokens
    report = {k: {"repeats_s": [round(x, 3) for x in v], "tok_per_s": round(tokens / statistics.median(v), 1)}
              for k, v in times.items()}  # fmt: skip
    for k in ("ours", "ours_without_native_kernels"):
        rounds = [u / o for u, o in zip(times["upstream"], times[k])]
        report[k]["ratio_median_of_rounds"] = round(statistics.median(rounds), 2)
        report[k]["ratio_per_round"] = [round(r, 2) for r in rounds]
    report.update(new_tokens=args.new_tokens, threads=args.threads, transformers=transformers_version)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
