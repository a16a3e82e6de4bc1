"""One command for a CUDA machine (`make gpu-check`): is MiniMind right and fast on this GPU?

In a few minutes, on the first GPU:
  1. attention: every masked training forward/backward (causal, packed documents, left padding, MoE)
     with SDPA's math kernel disabled, equal to the spec's dense-mask path within bf16 noise; padded
     prefill into a KV cache without the math kernel; the cache in the autocast dtype; host syncs
     counted in two MoE training steps;
  2. stages: every training stage a few steps through the real CLI in bf16, each training forward and
     backward with the math kernel disabled; pretrain and SFT with --compile on and off;
  3. DDP on NCCL at world size 1 (`torchrun --nproc_per_node 1`), with and without --compile;
  4. throughput: tokens/s, MFU and peak memory of pretraining minimind2-small and minimind2 at seq 512
     and 2048 (compiled, bf16, random tokens); decode tokens/s at batch 1 and 64.
It prints a table (markdown, for BENCHMARKS.md) and writes the figures as JSON (--json). Without a
CUDA device it says so in one line and exits 0; `--smoke` runs the same code on the CPU at toy sizes
(to check the script itself where there is no GPU).

    .venv/bin/python benchmarks/gpu_check.py [--json runs/gpu_check.json] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minimind import attention, engine  # noqa: E402
from minimind.config import ModelConfig, TrainConfig  # noqa: E402
from minimind.data.demo import write_demo_data  # noqa: E402
from minimind.data.packing import PackedRows  # noqa: E402
from minimind.data.readers import iter_texts  # noqa: E402
from minimind.generate import SamplingParams, generate  # noqa: E402
from minimind.model import KVCache, MiniMind  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
except ImportError:  # very old torch
    sdpa_kernel, FUSED = None, []


def no_math(device: torch.device) -> contextlib.AbstractContextManager:
    """SDPA without its math kernel (a masked call that would materialise B x H x T x T fails loudly)."""
    return sdpa_kernel(FUSED) if device.type == "cuda" and sdpa_kernel else contextlib.nullcontext()


def log(text: str) -> None:
    print(text, flush=True)


# ---- 1. attention kernels -------------------------------------------------------------------------


def check_attention(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base = dict(
        vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, max_position_embeddings=1024
    )
    B, T = 4, 256
    ids = torch.randint(3, 512, (B, T), device=device)
    starts = torch.tensor([[40, 100, 200]] * B, device=device)
    seg = (torch.arange(T, device=device)[None, None] >= starts[:, :, None]).sum(1)
    pad = (torch.arange(T, device=device)[None] >= torch.tensor([[0], [17], [64], [130]], device=device)).long()

    def fwd_bwd(model, **kw):
        model.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(ids, **kw).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, 512), ids[:, 1:].reshape(-1))
        loss.backward()
        return logits.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    worst = {"logits": 0.0, "grads": 0.0}
    shapes = [
        ("gqa+qk_norm", dict(qk_norm=True)),
        ("mha", dict(num_kv_heads=8)),
        ("moe", dict(use_moe=True, num_experts=4, num_experts_per_tok=2, num_shared_experts=1)),
    ]
    for name, extra in shapes:
        model = MiniMind(ModelConfig(**{**base, **extra})).to(device).train()
        for kw in ({}, {"segment_ids": seg}, {"attention_mask": pad}):
            with no_math(device):
                logits, grads = fwd_bwd(model, **kw)
            with attention.forced("dense"):  # the spec: one dense boolean mask through SDPA
                ref, ref_grads = fwd_bwd(model, **kw)
            keep = pad.bool() if "attention_mask" in kw else torch.ones_like(ids, dtype=torch.bool)
            err = ((logits - ref)[keep].abs().max() / ref[keep].abs().max()).item()
            gerr = max((grads[n] - g).norm().item() / max(g.norm().item(), 1e-12) for n, g in ref_grads.items())
            log(f"  {name:12s} {'/'.join(kw) or 'causal':14s} logits rel err {err:.1e}, worst grad rel err {gerr:.1e}")
            assert err < 2e-2 and gerr < 5e-2, (name, kw, err, gerr)
            worst = {"logits": max(worst["logits"], err), "grads": max(worst["grads"], gerr)}
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            cache = KVCache(model.cfg, B, T + 4, device, torch.bfloat16 if cuda else torch.float32)
            with no_math(device):
                model(ids, attention_mask=pad, cache=cache)  # padded prefill into a cache
            prompts = [ids[i, pad[i].bool()].tolist() for i in range(B)]
            generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0))
    syncs = -1
    if cuda:  # host syncs in a MoE training step (packed and padded), after a warm-up compiles flex
        model = MiniMind(ModelConfig(**base, use_moe=True, num_experts=4, num_experts_per_tok=2)).to(device).train()
        fwd_bwd(model, segment_ids=seg)
        fwd_bwd(model, attention_mask=pad)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            fwd_bwd(model, segment_ids=seg)
            fwd_bwd(model, attention_mask=pad)
            torch.cuda.set_sync_debug_mode("default")
        found = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
        syncs = len(found)
        log(f"  host syncs in two MoE training steps (incl. the check's own .float().clone()): {syncs}")
        for text in found[:5]:
            log(f"    {text}")
    return {"worst_logits_rel_err": worst["logits"], "worst_grad_rel_err": worst["grads"], "moe_step_syncs": syncs}


# ---- 2. every stage through the CLI --------------------------------------------------------------


def run_cli(argv: list) -> float:
    """`minimind ARGV` in this process, every training forward/backward without SDPA's math kernel."""
    from minimind.cli import main

    args = [str(a) for a in argv]
    log("  $ minimind " + " ".join(args))
    t0 = time.perf_counter()
    try:
        main(args)
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"minimind {' '.join(args)} exited with {e.code}") from None
    return time.perf_counter() - t0


def check_stages(work: Path, device: torch.device, smoke: bool) -> dict:
    files = write_demo_data(work / "data", scale=0.3)
    tok = Tokenizer.train(iter_texts([files["pretrain"], files["sft"]]), vocab_size=2048)
    tok.save(work / "tok")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    common = ["--max-seq-len", 256, "--batch-size", 8, "--cache-dir", work / "cache", "--log-every", 5]
    common += ["--device", device.type, "--dtype", dtype, "--seed", 0]
    steps = ["--max-steps", 4 if smoke else 10]
    r = work / "runs"
    # engine.autocast wraps each training forward (the backward follows the kernel it chose); rollouts,
    # reference and teacher passes outside the loss use their own import of it and are not restricted.
    plain = engine.autocast
    engine.autocast = lambda dev, dt: _stack(plain(dev, dt), no_math(dev))
    seconds = {}
    try:
        stages = [
            ("pretrain", ["pretrain", "--data", files["pretrain"], "--tokenizer", work / "tok", "--preset", "tiny",
                          "--out", r / "pretrain", *steps]),
            ("pretrain --doc-mask --compile", ["pretrain", "--data", files["pretrain"], "--tokenizer", work / "tok",
                                               "--preset", "tiny", "--out", r / "pretrain-c", "--doc-mask", "--compile",
                                               *steps]),
            ("sft", ["sft", "--from", r / "pretrain", "--data", files["sft"], "--out", r / "sft", *steps]),
            ("sft --compile", ["sft", "--from", r / "pretrain", "--data", files["sft"], "--out", r / "sft-c",
                               "--compile", *steps]),
            ("lora", ["lora", "--from", r / "sft", "--data", files["identity"], "--name", "id", *steps]),
            ("dpo", ["dpo", "--from", r / "sft", "--data", files["dpo"], "--out", r / "dpo", *steps]),
            ("reward", ["reward", "--from", r / "sft", "--data", files["dpo"], "--out", r / "reward", *steps]),
            ("reason", ["reason", "--from", r / "sft", "--data", files["reason"], "--out", r / "reason", *steps]),
            ("distill", ["distill", "--teacher", r / "sft", "--preset", "tiny", "--num-layers", 2, "--data",
                         files["sft"], "--out", r / "student", *steps]),
            ("grpo", ["grpo", "--from", r / "sft", "--data", files["rl"], "--reward", "rule:math", "--out", r / "grpo",
                      "--num-generations", 4, "--max-new-tokens", 16, "--max-steps", 3]),
            ("ppo", ["ppo", "--from", r / "sft", "--data", files["rl"], "--reward", "rule:math", "--out", r / "ppo",
                     "--max-new-tokens", 16, "--max-steps", 3]),
            ("spo", ["spo", "--from", r / "sft", "--data", files["rl"], "--reward", "rule:math", "--out", r / "spo",
                     "--max-new-tokens", 16, "--max-steps", 3, "--prioritize"]),
        ]  # fmt: skip
        for name, argv in stages:
            seconds[name] = round(run_cli([*argv, *common]), 1)
    finally:
        engine.autocast = plain
    return seconds


def _stack(*contexts: contextlib.AbstractContextManager) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for c in contexts:
        stack.enter_context(c)
    return stack


# ---- 3. DDP on NCCL at world size 1 --------------------------------------------------------------


def check_ddp(work: Path, device: torch.device) -> dict:
    """torchrun with one process: the engine builds its process group (NCCL + gloo), wraps DDP (then
    compile) and runs every collective; the result must equal the plain run."""
    from safetensors.torch import load_file

    files = work / "data"
    base = [sys.executable, "-m", "minimind", "pretrain", "--data", files / "pretrain.jsonl", "--tokenizer",
            work / "tok", "--preset", "tiny", "--max-seq-len", 256, "--batch-size", 8, "--max-steps", 6,
            "--cache-dir", work / "cache", "--device", device.type, "--log-every", 3, "--seed", 0,
            "--dtype", "float32"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    out = {}
    for name, cmd in [
        ("plain", base + ["--out", work / "ddp-plain"]),
        ("torchrun", launcher + ["-m", "minimind"] + base[3:] + ["--out", work / "ddp-1"]),
        ("torchrun --compile", launcher + ["-m", "minimind"] + base[3:] + ["--out", work / "ddp-1c", "--compile"]),
    ]:
        log("  $ " + " ".join(map(str, cmd)))
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out[name] = load_file(
            str(work / {"plain": "ddp-plain", "torchrun": "ddp-1"}.get(name, "ddp-1c") / "model.safetensors")
        )
    diff = {
        name: max((out[name][k] - out["plain"][k]).abs().max().item() for k in out["plain"])
        for name in ("torchrun", "torchrun --compile")
    }
    log(f"  max |weight difference| after 6 steps vs the plain run: {diff}")
    assert diff["torchrun"] < 1e-4, diff  # TF32 and kernel choice may differ between runs in the last bits
    return diff


# ---- 4. throughput -------------------------------------------------------------------------------


def train_throughput(work: Path, device: torch.device, preset: str, seq: int, batch: int, steps: int) -> dict:
    from minimind.checkpoint import new_model

    tok = Tokenizer.load(work / "tok")
    model = new_model(preset, tok, 0, seq, vocab_size=6400)
    n = batch * steps * seq + 1
    tokens = torch.randint(3, 6400, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(0)).numpy()
    rows = PackedRows(tokens, [0, n], seq)
    cfg = TrainConfig(out=str(work / f"tp-{preset}-{seq}"), max_seq_len=seq, batch_size=batch, accumulation=1,
                      max_steps=steps, log_every=max(1, steps // 4), warmup_steps=1, device=str(device),
                      compile=device.type == "cuda")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = engine.Trainer(cfg, model, tok, rows, {"stage": "gpu-check"})
    trainer.fit()
    records = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]  # the first window holds the compilation
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "preset": preset,
        "seq": seq,
        "batch": batch,
        "tokens_per_s": last["tokens_per_s"],
        "mfu": last.get("mfu", float("nan")),
        "peak_gib": round(peak, 2),
        "params_m": round(model.num_params() / 1e6, 2),
    }


def decode_throughput(device: torch.device, preset: str, batch: int, new_tokens: int) -> dict:
    from minimind.config import preset as make_preset

    model = MiniMind(make_preset(preset, vocab_size=6400)).to(device).eval()
    prompts = [[5 + (i * 7 + j) % 6000 for j in range(32)] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        generate(model, prompts, SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        out = generate(model, prompts, params)
    return {"preset": preset, "batch": batch, "decode_tokens_per_s": round(out.new_tokens / out.decode_s, 1)}


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.add_argument("--smoke", action="store_true", help="run on the CPU at toy sizes (checks this script)")
    p.add_argument("--work", metavar="DIR", help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: no CUDA device on this machine (torch {torch.__version__}, {build}); nothing to check.")
        return
    device = torch.device("cuda", 0) if not args.smoke else torch.device("cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    log(f"gpu-check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    result: dict = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        log("1. attention kernels (math backend disabled) against the dense-mask spec")
        result["attention"] = check_attention(device)
        log("2. every training stage, bf16, math backend disabled in the training forward and backward")
        result["stages_s"] = check_stages(work, device, args.smoke)
        log("3. DDP at world size 1 (torchrun; NCCL on CUDA)")
        result["ddp_max_diff"] = check_ddp(work, device)
        log("4. throughput")
        shapes = [("tiny", 128, 8, 8)] if args.smoke else [
            ("minimind2-small", 512, 64, 40), ("minimind2-small", 2048, 16, 40),
            ("minimind2", 512, 64, 40), ("minimind2", 2048, 16, 40),
        ]  # fmt: skip
        result["train"] = [train_throughput(work, device, *shape) for shape in shapes]
        presets = ["tiny"] if args.smoke else ["minimind2-small", "minimind2"]
        result["decode"] = [
            decode_throughput(device, pr, b, 16 if args.smoke else 128) for pr in presets for b in (1, 64)
        ]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log("")
    log(f"| model | seq | batch | tokens/s | MFU | peak GiB |  ({name}, bf16, --compile)")
    log("|---|---|---|---|---|---|")
    for r in result["train"]:
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"
        model = f"{r['preset']} ({r['params_m']}M)"
        log(f"| {model} | {r['seq']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']} |")
    log("")
    log("| model | decode batch | new tokens/s |")
    log("|---|---|---|")
    for r in result["decode"]:
        log(f"| {r['preset']} | {r['batch']} | {r['decode_tokens_per_s']:,.0f} |")
    log(f"\ngpu-check passed in {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
