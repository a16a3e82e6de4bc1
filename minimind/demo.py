"""`minimind demo`: the whole pipeline on built-in data, on CPU, in minutes (`make demo` runs it).

Each step prints what it measured. Steps that need later stages join as those stages land.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from minimind.checkpoint import init_run, load_run
from minimind.data.demo import write_demo_data
from minimind.data.readers import iter_texts
from minimind.generate import SamplingParams, generate
from minimind.tokenizer import StreamDecoder, Tokenizer


def add_arguments(p: Any) -> None:
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where data, tokenizer and runs go")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--pretrain-steps", type=int, default=300)


def first_question(conversation: list[dict]) -> tuple[list[dict], str]:
    """(prompt messages up to the first user turn, the reference first reply)."""
    k = next(i for i, m in enumerate(conversation) if m["role"] == "user")
    return conversation[: k + 1], conversation[k + 1]["content"]


def answer_accuracy(
    model: torch.nn.Module, tok: Tokenizer, conversations: list[list[dict]], contains: str | None = None
) -> tuple[float, list[str]]:
    """Share of greedy answers to each conversation's first question that equal the reference reply
    (or, with `contains`, that mention that text), and the answers themselves."""
    prompts, refs = zip(*(first_question(c) for c in conversations))
    ids = [tok.encode_chat(list(p), add_generation_prompt=True) for p in prompts]
    out = generate(model, ids, SamplingParams(max_new_tokens=48, temperature=0, stop_ids=tok.stop_ids))
    answers = [tok.decode(g.tokens, skip_special_tokens=True).strip() for g in out.generations]
    hits = [(contains in a) if contains else (a == r) for a, r in zip(answers, refs)]
    return sum(hits) / len(hits), answers


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def naive_decode_tokens_per_s(model: torch.nn.Module, prompt: list[int], n: int) -> float:
    """Greedy decoding that recomputes the whole sequence each step (what a KV cache avoids)."""
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return n / (time.perf_counter() - start)


def main(args: Any) -> None:
    from minimind.config import TrainConfig
    from minimind.data.packing import PackedRows
    from minimind.data.tokens import tokenize_files
    from minimind.engine import Trainer, evaluate_loss

    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.perf_counter()

    section("1. built-in data (minimind data demo)")
    files = write_demo_data(out / "data")
    for name in ("pretrain", "sft", "dpo", "rl", "reason", "identity"):
        n = sum(1 for _ in open(files[name], encoding="utf-8"))
        print(f"   {name:>8}: {n:5d} train lines + held-out split -> {files[name]}")
    print("   e.g. " + next(iter_texts([files["pretrain"]])))

    section("2. tokenizer (byte-level BPE)")
    tok = Tokenizer.train(iter_texts([files["pretrain"], files["sft"]]), vocab_size=args.vocab_size)
    tok.save(out / "tokenizer")
    print(
        f"   trained {tok.vocab_size} ids (asked for {args.vocab_size}; a small corpus may merge fewer) "
        f"-> {out / 'tokenizer'}"
    )
    for text in ("Mia lives in Oakvale.", "小明住在橡树镇。", "12 + 30 = 42. 🙂"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        print(f"   {text!r}: {len(ids)} tokens, round trip exact")
    chat = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    print(f"   chat template: {tok.render_chat([{'role': 'user', 'content': 'hi'}], True)!r} -> {chat}")

    section("3. pretraining (preset tiny, packed rows, CPU fp32)")
    run_dir = out / "pretrain"
    model = init_run("tiny", tok, out / "init", seed=args.seed)
    tokens = tokenize_files([files["pretrain"]], tok, out / "cache")
    held = tokenize_files([files["pretrain_heldout"]], tok, out / "cache")
    seq = 128
    rows, held_rows = PackedRows(tokens.tokens, tokens.offsets, seq), PackedRows(held.tokens, held.offsets, seq)
    print(f"   {model.num_params() / 1e6:.2f}M parameters; {len(tokens.tokens):,} tokens -> {len(rows)} rows of {seq}")
    before = evaluate_loss(model, held_rows)
    cfg = TrainConfig(
        out=str(run_dir),
        max_seq_len=seq,
        batch_size=16,
        accumulation=1,
        lr=3e-3,
        max_steps=args.pretrain_steps,
        warmup_steps=10,
        log_every=25,
        seed=args.seed,
        device="cpu",
    )
    result = Trainer(cfg, model, tok, rows, {"stage": "pretrain", "parent": str(out / "init")}).fit()
    after = evaluate_loss(model, held_rows)
    print(
        f"   held-out loss {before:.3f} -> {after:.3f} nats/token (perplexity {math.exp(before):.0f} -> "
        f"{math.exp(after):.1f}); {result.tokens_per_s:,.0f} tokens/s; loss plot: {run_dir / 'loss.png'}"
    )

    section("4. generation from the pretrained model")
    run = load_run(run_dir)
    params = SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=args.seed, stop_ids=tok.stop_ids)
    for text in ("Mia lives in", "小明养了一只", "12 + 30 ="):
        prompt = [tok.bos_id] + tok.encode(text)
        stream = StreamDecoder(tok)
        print(f"   {text}", end="", flush=True)
        generate(
            run.model,
            [prompt],
            params,
            on_token=lambda _, t, s=stream: print(s.push(t), end="", flush=True) if t not in tok.stop_ids else None,
        )
        print(stream.flush())

    section("5. decode speed: KV cache vs recomputing the sequence")
    n = 256
    prompt = [tok.bos_id] + tok.encode("Mia lives in")
    greedy = SamplingParams(max_new_tokens=n, temperature=0)
    cached = generate(run.model, [prompt], greedy).decode_tokens_per_s
    naive = naive_decode_tokens_per_s(run.model, prompt, n)
    print(f"   {n} new tokens, batch 1: cached {cached:.0f} tok/s, recompute {naive:.0f} tok/s ({cached / naive:.1f}x)")

    section("done")
    print(
        f"finished in {time.perf_counter() - t0:.0f} s. Post-training stages (SFT, LoRA, DPO, RL, ...) join this "
        "demo as they land; see README.md."
    )
