"""`minimind demo`: the whole pipeline on built-in data, on CPU, in minutes (`make demo` runs it).

Each step prints what it measured. Steps that need later stages join as those stages land.
"""

from __future__ import annotations

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
    torch.manual_seed(args.seed)
    out = Path(args.out)
    t0 = time.perf_counter()

    section("1. built-in data")
    files = write_demo_data(out / "data")
    for name, path in files.items():
        print(f"{name:>18}: {path} ({sum(1 for _ in open(path, encoding='utf-8'))} lines)")
    print("   e.g. " + next(iter_texts([files["pretrain"]])))

    section("2. tokenizer (byte-level BPE)")
    tok = Tokenizer.train(iter_texts([files["pretrain"]]), vocab_size=args.vocab_size)
    tok.save(out / "tokenizer")
    print(
        f"trained {tok.vocab_size} ids (asked for {args.vocab_size}; a small corpus may merge fewer) "
        f"-> {out / 'tokenizer'}"
    )
    for text in ("Mia lives in Oakvale.", "小明住在橡树镇。", "12 + 30 = 42. 🙂"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        print(f"   {text!r}: {len(ids)} tokens, round trip exact")
    chat = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    print(f"   chat template: {tok.render_chat([{'role': 'user', 'content': 'hi'}], True)!r} -> {chat}")

    section("3. a fresh model (preset tiny)")
    run_dir = out / "init"
    model = init_run("tiny", tok, run_dir, seed=args.seed)
    print(
        f"{model.num_params() / 1e6:.2f}M parameters -> {run_dir} "
        f"({', '.join(sorted(p.name for p in run_dir.iterdir()))})"
    )
    run = load_run(run_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), run.model.state_dict().values()))
    print("   reloaded strictly from safetensors: bit-exact")

    section("4. generation from the untrained model")
    print("The weights are random, so the text is too: this shows the sampling engine, not learning.")
    prompt = [tok.bos_id] + tok.encode("Mia lives in")
    stream = StreamDecoder(tok)
    print("   Mia lives in", end="", flush=True)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=args.seed, stop_ids=tok.stop_ids)
    generate(run.model, [prompt], params, on_token=lambda _, t: print(stream.push(t), end="", flush=True))
    print(stream.flush())

    section("5. decode speed: KV cache vs recomputing the sequence")
    n = 256
    greedy = SamplingParams(max_new_tokens=n, temperature=0)
    cached = generate(run.model, [prompt], greedy).decode_tokens_per_s
    naive = naive_decode_tokens_per_s(run.model, prompt, n)
    print(f"   {n} new tokens, batch 1: cached {cached:.0f} tok/s, recompute {naive:.0f} tok/s ({cached / naive:.1f}x)")

    section("done")
    print(
        f"finished in {time.perf_counter() - t0:.0f} s. Training stages (pretrain, SFT, ...) join this demo "
        "as they land; see README.md."
    )
