"""`minimind demo`: the whole pipeline on built-in data, on CPU, in minutes (`make demo` runs it).

Each step prints what it measured. Steps that need later stages join as those stages land.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from minimind.checkpoint import init_run, load_run
from minimind.data.demo import offered_tools, write_demo_data
from minimind.data.readers import iter_texts
from minimind.generate import SamplingParams, generate
from minimind.tokenizer import StreamDecoder, Tokenizer


def add_arguments(p: Any) -> None:
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where data, tokenizer and runs go")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--lora-steps", type=int, default=80)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--reason-steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=80)
    p.add_argument("--grpo-steps", type=int, default=90)
    p.add_argument("--tool-sft-steps", type=int, default=450)
    p.add_argument("--agent-steps", type=int, default=16)


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
    tok = Tokenizer.train(iter_texts([files["pretrain"], files["sft"], files["tool_sft"]]), vocab_size=args.vocab_size)
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

    post_training(out, files, args)
    preference_and_reasoning(out, files, args)
    distillation(out, files, args)
    reinforcement(out, files, args)
    tool_use(out, files, args)
    interop(out)

    section("done")
    print(f"finished in {time.perf_counter() - t0:.0f} s. Every step above is one command; see README.md.")


def cli(*argv: Any) -> None:
    """Run a `minimind` command in this process, showing the exact command line first."""
    from minimind.cli import main as minimind

    args = [str(a) for a in argv]
    print("   $ minimind " + " ".join(args))
    minimind(args)


def common_flags(out: Path, args: Any) -> list[Any]:
    """Training flags every post-training step of the demo shares."""
    return [
        *("--max-seq-len", 128, "--batch-size", 16, "--cache-dir", out / "cache", "--seed", args.seed),
        *("--log-every", 50, "--warmup-steps", 10),
    ]


def post_training(out: Path, files: dict[str, Path], args: Any) -> None:
    """SFT -> LoRA identity adapter -> chat -> eval, each measured on held-out demo data."""
    from minimind.data.chat import iter_conversations
    from minimind.data.demo import IDENTITY_QUESTIONS
    from minimind.eval import evaluate
    from minimind.lora import load_adapter

    common = common_flags(out, args)
    held = list(iter_conversations([files["sft_heldout"]]))[:100]
    shutil.rmtree(out / "sft", ignore_errors=True)  # the demo owns its directory: start clean

    section("6. SFT: loss on assistant replies only, conversations packed per row")
    cli("sft", "--from", out / "pretrain", "--data", files["sft"], "--show-mask", 1, "--out", out / "sft", *common)
    cli("sft", "--from", out / "pretrain", "--data", files["sft"], "--eval-data", files["sft_heldout"],
        "--out", out / "sft", "--max-steps", args.sft_steps, *common)  # fmt: skip
    base, sft = load_run(out / "pretrain"), load_run(out / "sft")
    before, _ = answer_accuracy(base.model, base.tokenizer, held)
    after, answers = answer_accuracy(sft.model, sft.tokenizer, held)
    print(f"   held-out questions answered exactly right: pretrained {before:.0%} -> SFT {after:.0%}")
    for conv, answer in list(zip(held, answers))[:4]:
        q, ref = first_question(conv)
        print(f"   Q: {q[-1]['content']}  A: {answer}  (reference: {ref})")

    section("7. LoRA: a rank-8 adapter that gives the SFT model a new name")
    adapter = out / "sft" / "lora" / "identity"
    cli("lora", "--from", out / "sft", "--data", files["identity"], "--name", "identity",
        "--max-steps", args.lora_steps, *common)  # fmt: skip
    who = [c for c in iter_conversations([files["identity_heldout"]]) if c[0]["content"] in IDENTITY_QUESTIONS]
    named_before, plain = answer_accuracy(sft.model, sft.tokenizer, who, contains="Lumi")
    load_adapter(sft.model, adapter)
    named_after, renamed = answer_accuracy(sft.model, sft.tokenizer, who, contains="Lumi")
    still_right, _ = answer_accuracy(sft.model, sft.tokenizer, held)
    print(f"   held-out identity questions answered with the new name: {named_before:.0%} -> {named_after:.0%}")
    print(f"   other held-out questions still answered right: {after:.0%} -> {still_right:.0%}")
    print(f"   Q: {who[0][0]['content']}  without adapter: {plain[0]}  with: {renamed[0]}")

    section("8. chat (one answer with --prompt; leave it out for an interactive session)")
    cli("chat", out / "sft", "--lora", adapter, "--prompt", "Who are you?", "--temperature", 0)
    cli("chat", out / "sft", "--prompt", "What is 21 + 14?", "--temperature", 0, "--verbose")

    section("9. evaluation on held-out data (minimind eval)")
    rows = [
        ("ppl", "pretrain", files["pretrain_heldout"]),
        ("ppl", "sft", files["sft_heldout"]),
        ("mc", "pretrain", files["mc_heldout"]),
        ("mc", "sft", files["mc_heldout"]),
        ("gsm8k", "pretrain", files["math_heldout"]),
        ("gsm8k", "sft", files["math_heldout"]),
    ]
    runs = {"pretrain": base, "sft": load_run(out / "sft")}
    print(f"   {'task':<6} {'run':<9} {'data':<22} {'n':>4}  score")
    for task, name, data in rows:
        r = evaluate(runs[name], task, data, limit=100, max_new_tokens=24)
        m = r["metrics"]
        detail = (
            f"ppl {m['ppl']:.2f}, {m['bpb']:.3f} bits/byte"
            if task == "ppl"
            else f"accuracy {m['accuracy']:.0%}" + (f" (chance {m['chance']:.0%})" if "chance" in m else "")
        )
        print(f"   {task:<6} {name:<9} {Path(data).name:<22} {r['n']:>4}  {detail}")


def preference_and_reasoning(out: Path, files: dict[str, Path], args: Any) -> None:
    """DPO on preference pairs, then reasoning distillation, each from the SFT run."""
    from minimind.data.chat import iter_conversations
    from minimind.eval import evaluate

    common = common_flags(out, args)
    held = list(iter_conversations([files["sft_heldout"]]))[:100]
    for name in ("dpo", "reason"):
        shutil.rmtree(out / name, ignore_errors=True)

    section("10. DPO: prefer the right answer over a wrong one (held-out pairs)")
    cli("dpo", "--from", out / "sft", "--data", files["dpo"], "--eval-data", files["dpo_heldout"],
        "--out", out / "dpo", "--max-steps", args.dpo_steps, "--nll-weight", 0.3, *common)  # fmt: skip
    sft, dpo = load_run(out / "sft"), load_run(out / "dpo")
    before, _ = answer_accuracy(sft.model, sft.tokenizer, held)
    after, _ = answer_accuracy(dpo.model, dpo.tokenizer, held)
    print(f"   held-out questions answered exactly right: SFT {before:.0%} -> DPO {after:.0%}")

    section("11. reasoning distillation: <think>...</think><answer>...</answer>, tags weighted x10")
    cli("reason", "--from", out / "sft", "--data", files["reason"], "--eval-data", files["reason_heldout"],
        "--out", out / "reason", "--max-steps", args.reason_steps, "--format-tokens", 96, *common)  # fmt: skip
    reasoner = load_run(out / "reason")
    for name, run in (("SFT", sft), ("reason", reasoner)):
        r = evaluate(run, "gsm8k", files["math_heldout"], limit=100, max_new_tokens=96)
        print(f"   {name:>6}: held-out sums answered right {r['metrics']['accuracy']:.0%}")
    cli("chat", out / "reason", "--prompt", "What is 27 + 35?", "--temperature", 0)


def distillation(out: Path, files: dict[str, Path], args: Any) -> None:
    """A 6x smaller student on 100 documents, taught by the pretrained model vs by the data alone."""
    from minimind.data.packing import PackedRows
    from minimind.data.tokens import tokenize_files
    from minimind.engine import evaluate_loss
    from minimind.teacher import describe_kd, evaluate_kd, load_teacher

    section("12. knowledge distillation: a 6x smaller student on 100 documents, teacher vs data alone")
    few = out / "data" / "pretrain_100.jsonl"
    lines = files["pretrain"].read_text(encoding="utf-8").splitlines(keepends=True)[:100]
    few.write_text("".join(lines), encoding="utf-8")
    teacher, tok = load_teacher(str(out / "pretrain"))
    held = tokenize_files([files["pretrain_heldout"]], tok, out / "cache")
    rows = PackedRows(held.tokens, held.offsets, 128)
    print(f"   teacher ({teacher.num_params() / 1e6:.2f}M): held-out CE {evaluate_loss(teacher, rows):.3f} nats/token")
    for name, alpha in (("distilled", 0), ("data-only", 1)):
        shutil.rmtree(out / f"student-{name}", ignore_errors=True)
        cli("distill", "--teacher", out / "pretrain", "--preset", "tiny", "--hidden-size", 64, "--num-layers", 2,
            "--data", few, "--out", out / f"student-{name}", "--alpha", alpha, "--temperature", 1, "--lr", 3e-3,
            "--max-steps", args.distill_steps, "--accumulation", 1, *common_flags(out, args))  # fmt: skip
        student = load_run(out / f"student-{name}").model
        measured = describe_kd(evaluate_kd(student, teacher, rows))
        print(f"   {name} ({student.num_params() / 1e6:.2f}M): held-out {measured}")


def reinforcement(out: Path, files: dict[str, Path], args: Any) -> None:
    """GRPO with a rule reward on arithmetic prompts, from the SFT run."""
    section("13. GRPO: 16 sampled answers per sum, rewarded when right (rule:math)")
    shutil.rmtree(out / "grpo", ignore_errors=True)
    cli("grpo", "--from", out / "sft", "--data", files["rl"], "--eval-data", files["rl_heldout"],
        "--reward", "rule:math", "--out", out / "grpo", "--max-steps", args.grpo_steps, "--batch-size", 8,
        "--num-generations", 16, "--temperature", 0.7, "--max-new-tokens", 16, "--log-every", 25,
        "--seed", args.seed)  # fmt: skip
    print("   (mean reward = share of the held-out sums answered right; none of them is in any training file)")
    from minimind.data.prompts import read_prompts
    from minimind.rl.rewards import parse_reward
    from minimind.rl.rollout import RLOptions, held_out_rewards

    practised = read_prompts([files["rl"]])[:400]
    opts, reward = RLOptions(max_new_tokens=16), parse_reward("rule:math")
    before, after = (
        held_out_rewards(r.model, r.tokenizer, practised, reward, opts)["greedy"]["reward"]
        for r in (load_run(out / "sft"), load_run(out / "grpo"))
    )
    print(f"   greedy sums right on 400 of the prompts it practised: SFT {before:.1%} -> GRPO {after:.1%}")


def tool_use(out: Path, files: dict[str, Path], args: Any) -> None:
    """SFT on conversations that call the calculator (half of the products answered with it, half
    without: the model learns to copy the operands into the call and the result into the answer, but
    calls on few questions), then agentic RL: episodes that run the calls in the sandbox, rewarded for
    right answers, so the model learns to call the calculator whenever it multiplies."""
    from minimind.eval import evaluate

    section("14. tool use: SFT with tool calls, then agentic RL (minimind agent) with the sandboxed calculator")
    for name in ("tools", "agent"):
        shutil.rmtree(out / name, ignore_errors=True)
    cli("sft", "--from", out / "sft", "--data", files["tool_sft"], "--out", out / "tools", "--max-seq-len", 304,
        "--batch-size", 8, "--lr", 2e-3, "--max-steps", args.tool_sft_steps, "--warmup-steps", 10, "--log-every", 50,
        "--cache-dir", out / "cache", "--seed", args.seed)  # fmt: skip
    cli("agent", "--from", out / "tools", "--data", files["agent"], "--out", out / "agent", "--max-steps",
        args.agent_steps, "--batch-size", 4, "--num-generations", 8, "--max-new-tokens", 40, "--max-turns", 2,
        "--max-seq-len", 400, "--lr", 1e-4, "--temperature", 0.7, "--log-every", 4, "--seed", args.seed)  # fmt: skip
    reports = {
        name: evaluate(load_run(out / name), "tools", files["tools_heldout"], max_new_tokens=40, max_turns=2)
        for name in ("tools", "agent")
    }
    n = reports["tools"]["n"]
    print(f"   greedy episodes on {n} held-out products (none of them in any training file):")
    for key, what in (
        ("used_tools", "episodes that called a tool"),
        ("valid_calls", "calls well-formed, to an offered tool, arguments fitting its schema"),
        ("arguments", "calls with exactly the expected arguments"),
        ("correct", "final answers right"),
    ):
        a, b = (reports[name]["metrics"][key] for name in ("tools", "agent"))
        print(f"   {what:<68} SFT {a:6.1%} -> agent {b:6.1%}")
    tools = out / "data" / "calculator.json"  # the calculator as the training data offered it
    tools.write_text(json.dumps(offered_tools(random.Random(0), "calculate_math"), ensure_ascii=False))
    cli("chat", out / "agent", "--tools", tools, "--prompt", "What is 37 times 48?", "--temperature", 0)


def interop(out: Path) -> None:
    """The SFT model leaves MiniMind: a transformers folder and a GGUF file, each asked one question."""
    import importlib.util

    section("15. export: transformers folder and GGUF for llama.cpp / ollama, then how to serve")
    sft = load_run(out / "sft")
    question = [{"role": "user", "content": "What is 21 + 14?"}]
    ids = sft.tokenizer.encode_chat(question, add_generation_prompt=True)
    ours = generate(sft.model, [ids], SamplingParams(max_new_tokens=16, temperature=0, stop_ids=sft.tokenizer.stop_ids))
    print(f"   MiniMind greedy answer: {sft.tokenizer.decode(ours.generations[0].tokens, skip_special_tokens=True)!r}")
    shutil.rmtree(out / "hf", ignore_errors=True)
    cli("export", out / "sft", "--format", "hf", "--out", out / "hf")
    if importlib.util.find_spec("transformers"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
        hf_ids = hf_tok.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            got = model.generate(torch.tensor([hf_ids]), max_new_tokens=16, do_sample=False)[0, len(hf_ids) :]
        answer = hf_tok.decode(got, skip_special_tokens=True)
        print(f"   transformers ({type(model).__name__}, same prompt ids: {hf_ids == ids}) greedy answer: {answer!r}")
    cli("export", out / "sft", "--format", "gguf", "--out", out / "minimind-sft.gguf", "--dtype", "f32")
    if importlib.util.find_spec("llama_cpp"):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(out / "minimind-sft.gguf"), n_ctx=256, verbose=False)
        got = llm.create_completion(ids, max_tokens=16, temperature=0)["choices"][0]["text"]
        llm.close()
        print(f"   llama.cpp greedy answer: {got!r}")
    print(f"   serve it (OpenAI API + web chat at http://127.0.0.1:8998/): minimind serve {out / 'sft'}")
