"""Evaluate a run: perplexity and bits per byte, multiple choice by log-likelihood, GSM8K by generation.

ppl    documents (pretrain `{"text"}` / .txt: every token of `<|im_start|> text <|im_end|>` after the
       first; SFT `{"conversations"}`: only the trained assistant tokens, each reply's `<|im_end|>`
       included) scored by one forward pass each:
           nll = -(1/N) sum_t log p(x_t | x_<t),   ppl = exp(nll),   bpb = N nll / ln 2 / bytes
       where bytes is the UTF-8 size of the scored text (the documents; for SFT, the assistant replies).
       A document longer than --max-seq-len is cut into windows of max_seq_len + 1 tokens that overlap
       by one token: every target is scored exactly once, each window starting with no earlier context.
mc     each option scored as the continuation of the question:  s(o) = sum_t log p(o_t | prompt, o_<t).
       accuracy takes argmax s(o); accuracy_norm takes argmax s(o) / |o| (tokens); chance = mean 1/k.
       Pretrain/init runs see `Question: q\\nAnswer:` + " " + option; chat runs see the question as a
       user turn and the option (plus its `<|im_end|>`) as the assistant's reply.
gsm8k  greedy generation, then the predicted number (`#### N`, else `<answer>N</answer>`, else the
       last number) compared with the reference as a number (72.0 == 72). Exact-match accuracy.
tools  greedy multi-turn episodes (minimind/rl/episodes.py) on agentic prompts (tools on the system
       message, `gt` the values a right answer gives, optional `expected_calls` [{"name", "arguments"}]),
       the calls run by the sandboxed toolbox (--tools): valid-call rate, right-tool rate, argument
       match, episodes that used tools / answered, and final-answer accuracy (every gt value given).
format greedy generation for the first user turn of each SFT conversation (chat template, the reply
       opening `<think>` itself, as `minimind reason` trains it); the share of replies that are exactly
       `<think>…</think>` then `<answer>…</answer>`, both non-empty (whitespace around them allowed).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from minimind.chatformat import follows_format
from minimind.checkpoint import Run
from minimind.data.evalsets import MathItem, MCItem, extract_number, read_gsm8k, read_mc, same_number
from minimind.data.prompts import encode_prompt, render_prompt
from minimind.data.readers import iter_jsonl
from minimind.errors import ConfigError, DataError
from minimind.heldout import HeldOut, token_logprobs
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

TASKS = ("ppl", "mc", "gsm8k", "format", "tools")
Prompt = str | list[dict[str, str]]  # plain text, or chat messages

# ---- scoring: log-probabilities of the tokens of given sequences ------------------------------


def score_options(
    model: MiniMind,
    tokenizer: Tokenizer,
    prompts_and_options: list[tuple[Prompt, list[str]]],
    chat: bool,
    batch_size: int = 16,
    max_len: int | None = None,
) -> list[list[tuple[float, int]]]:
    """(sum_t log p(o_t | prompt, o_<t), number of tokens) of every option o of every prompt.

    Chat: the option is the assistant's reply and its closing `<|im_end|>` is scored too. Plain:
    the option's text is scored exactly as given (pass " " + option after "Answer:"). Prompt and
    option are encoded separately and joined, so every option sees the same prompt ids. A pair
    longer than max_len + 1 tokens loses the start of its prompt. All pairs are batched together.
    """
    max_len = min(max_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
    seqs, spans = [], []
    for prompt, options in prompts_and_options:
        p = encode_prompt(tokenizer, prompt, chat=chat)
        for option in options:
            c = tokenizer.encode(option) + ([tokenizer.eos_id] if chat else [])
            seqs.append((p + c)[-(max_len + 1) :])
            spans.append(min(len(c), len(seqs[-1]) - 1))
    logps = token_logprobs(model, seqs, batch_size)
    flat = [(float(lp[len(lp) - n :].sum()), n) for lp, n in zip(logps, spans)]
    it = iter(flat)
    return [[next(it) for _ in options] for _, options in prompts_and_options]


# ---- prompts --------------------------------------------------------------------------------------


def build_prompt(question: str, shots: list[tuple[str, str]], chat: bool) -> Prompt:
    """Few-shot prompt: solved (question, answer) examples first, as earlier turns for chat runs."""
    if chat:
        messages = []
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": question}]
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}\nAnswer:"


def is_chat(run: Run, prompt_style: str = "auto") -> bool:
    """Chat template unless the run never saw it (stage pretrain or init), or the style is forced."""
    if prompt_style not in ("auto", "plain", "chat"):
        raise ConfigError(f"prompt style must be auto, plain or chat, not {prompt_style!r}")
    return prompt_style == "chat" or (prompt_style == "auto" and run.is_chat)


def greedy_replies(
    run: Run, prompts: list[Prompt], wheres: list[str], chat: bool, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy reply to every prompt (the stop token dropped); prompts of similar length share a batch."""
    from minimind.generate import SamplingParams, generate

    tok, max_pos = run.tokenizer, run.model.cfg.max_position_embeddings
    ids = [encode_prompt(tok, p, chat=chat) for p in prompts]
    replies = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        room = max_pos - max(len(ids[i]) for i in rows)
        if room < 1:
            longest = max(rows, key=lambda i: len(ids[i]))
            raise ConfigError(f"{wheres[longest]}: the prompt fills the model's context ({max_pos} tokens)")
        params = SamplingParams(temperature=0.0, max_new_tokens=min(max_new_tokens, room), stop_ids=tok.stop_ids)
        for i, g in zip(rows, generate(run.model, [ids[i] for i in rows], params).generations):
            replies[i] = tok.decode(g.tokens[:-1] if g.finish_reason == "stop" else g.tokens)
    return replies


# ---- the tasks ------------------------------------------------------------------------------------


def eval_ppl(run: Run, path: Path, limit: int | None, batch_size: int, max_len: int) -> tuple[dict, list[dict]]:
    held = HeldOut.read([path], run.tokenizer, max_len, limit)
    scores = held.score(run.model, batch_size)
    metrics = {"ppl": math.exp(scores.loss), "nll": scores.loss, "bpb": scores.bpb}
    metrics |= {"tokens": int(scores.count.sum()), "bytes": scores.nbytes, "format": held.format}
    items = [
        {
            "text": d.preview[:200],
            "tokens": int(c),
            "bytes": d.nbytes,
            "nll": n / max(c, 1),
            "ppl": math.exp(n / max(c, 1)),
        }
        for d, n, c in zip(held.docs, scores.nll.tolist(), scores.count.tolist())
    ]
    return metrics, items


def eval_mc(
    run: Run, path: Path, limit: int | None, batch_size: int, max_len: int, chat: bool, shots: list[MCItem]
) -> tuple[dict, list[dict]]:
    items = read_mc(path)[:limit]
    chance = [1 / len(it.choices) for it in items]
    examples = [(s.question, s.choices[s.answer]) for s in shots]
    prompts = [build_prompt(it.question, examples, chat) for it in items]
    pairs = [(p, [c if chat else " " + c for c in it.choices]) for p, it in zip(prompts, items)]
    scores = score_options(run.model, run.tokenizer, pairs, chat, batch_size, max_len)
    results = []
    for it, prompt, row in zip(items, prompts, scores):
        pick, pick_norm = int(np.argmax([s for s, _ in row])), int(np.argmax([s / max(n, 1) for s, n in row]))
        results.append(
            {
                "where": it.where,
                "question": it.question,
                "prompt": render_prompt(run.tokenizer, prompt, chat=chat),
                "choices": dict(zip(it.letters, it.choices)),
                "reference": it.letters[it.answer],
                "prediction": it.letters[pick],
                "prediction_norm": it.letters[pick_norm],
                "correct": pick == it.answer,
                "scores": [s for s, _ in row],
                "tokens": [n for _, n in row],
            }
        )
    accuracy = float(np.mean([r["correct"] for r in results]))
    accuracy_norm = float(np.mean([r["prediction_norm"] == r["reference"] for r in results]))
    return {"accuracy": accuracy, "accuracy_norm": accuracy_norm, "chance": float(np.mean(chance))}, results


def eval_gsm8k(
    run: Run, path: Path, limit: int | None, batch_size: int, max_new_tokens: int, chat: bool, shots: list[MathItem]
) -> tuple[dict, list[dict]]:
    tok = run.tokenizer
    items = read_gsm8k(path)[:limit]
    prompts = [build_prompt(it.question, [(s.question, s.answer) for s in shots], chat) for it in items]
    replies = greedy_replies(run, prompts, [it.where for it in items], chat, batch_size, max_new_tokens)
    replies = [r if chat else r.split("\nQuestion:")[0] for r in replies]  # a plain model may invent more
    results = []
    for it, prompt, reply in zip(items, prompts, replies):
        pred = extract_number(reply)
        results.append(
            {
                "where": it.where,
                "question": it.question,
                "prompt": render_prompt(tok, prompt, chat=chat),
                "output": reply,
                "prediction": pred,
                "reference": it.reference,
                "correct": same_number(pred, it.reference),
            }
        )
    answered = float(np.mean([r["prediction"] is not None for r in results]))
    return {"accuracy": float(np.mean([r["correct"] for r in results])), "answered": answered}, results


def eval_format(
    run: Run, path: Path, limit: int | None, batch_size: int, max_new_tokens: int, chat: bool
) -> tuple[dict, list[dict]]:
    from minimind.data.messages import check_messages

    prompts: list[Prompt] = []
    wheres: list[str] = []
    for lineno, obj in itertools.islice(iter_jsonl(path), limit):
        where = f"{path}:{lineno}"
        if "conversations" not in obj:
            raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [...]}})")
        messages = check_messages(obj["conversations"], where, final=None)
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        prompts.append(messages[: first + 1] if chat else messages[first]["content"])
        wheres.append(where)
    if not prompts:
        raise DataError(f"{path}: no conversations")
    replies = greedy_replies(run, prompts, wheres, chat, batch_size, max_new_tokens)
    items = [
        {"where": w, "prompt": render_prompt(run.tokenizer, p, chat=chat), "output": r, "follows": follows_format(r)}
        for w, p, r in zip(wheres, prompts, replies)
    ]
    metrics = {
        "format": float(np.mean([it["follows"] for it in items])),
        "think": float(np.mean([bool(re.search(r"<think>.*?</think>", r, re.S)) for r in replies])),
        "answer": float(np.mean([bool(re.search(r"<answer>.*?</answer>", r, re.S)) for r in replies])),
    }
    return metrics, items


def eval_tools(
    run: Run,
    path: Path,
    limit: int | None,
    max_new_tokens: int,
    tools: str,
    max_turns: int,
    max_len: int,
    batch_size: int = 16,
) -> tuple[dict, list[dict]]:
    from minimind.data.messages import check_calls
    from minimind.data.prompts import check_prompt
    from minimind.generate import SamplingParams
    from minimind.rl.episodes import run_episodes, tool_metrics
    from minimind.toolbox import load_toolbox

    prompts, expected = [], []
    for lineno, obj in itertools.islice(iter_jsonl(path), limit):
        where = f"{path}:{lineno}"
        prompts.append(check_prompt(obj, where))
        if not prompts[-1].gt:
            raise DataError(f"{where}: a tool-use case needs 'gt', the values a right final answer gives")
        expected.append(check_calls(obj.get("expected_calls"), where) if "expected_calls" in obj else None)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    tok = run.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_ids=tok.stop_ids)
    toolbox = load_toolbox(tools)
    episodes = run_episodes(run.model, tok, prompts, toolbox, params, max_turns, max_len, batch_size=batch_size)
    have = [i for i, x in enumerate(expected) if x is not None]
    metrics = tool_metrics(prompts, episodes)
    if have:  # right tool and arguments, over the cases that say what to call
        sub = tool_metrics([prompts[i] for i in have], [episodes[i] for i in have], [expected[i] for i in have])
        metrics.update(right_tool=sub["right_tool"], arguments=sub["arguments"])
    items = [
        {
            "where": p.where,
            "turns": e.turns,
            "results": e.results,
            "calls": [{"name": c.name, "arguments": c.arguments, "error": c.error} for c in e.calls],
            "answer": e.answer,
            "gt": p.gt,
            "unfinished": e.unfinished,
        }
        for p, e in zip(prompts, episodes)
    ]
    return metrics, items


def evaluate(
    run: Run,
    task: str,
    data: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    max_seq_len: int = 512,
    max_new_tokens: int = 256,
    dev: str | Path | None = None,
    shots: int | None = None,
    prompt_style: str = "auto",
    run_dir: str | Path | None = None,
    tools: str = "builtin",
    max_turns: int = 3,
) -> dict[str, Any]:
    """The report of one task on one file: {task, run, stage, data, n, score, metric, metrics,
    prompt_style, shots, seconds, items}.

    `score` is the main metric: ppl for ppl, accuracy for mc and gsm8k, the compliant share for
    format. `shots` solved examples come from the start of `dev` (default: 5 when a dev file is
    given, else none). `run_dir` is only recorded in the report. prompt_style: auto (plain for
    pretrain/init runs, else chat) | plain | chat.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    for name, value in (("limit", limit), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1")
    data = Path(data)
    if not data.is_file():
        raise DataError(f"{data}: no such file")
    chat = is_chat(run, prompt_style)
    shots = (5 if dev else 0) if shots is None else shots
    if shots < 0:
        raise ConfigError("shots must be 0 or more")
    if shots and not dev:
        raise ConfigError("--shots needs --dev FILE with solved examples")
    if task in ("ppl", "format", "tools") and shots:
        raise ConfigError(f"{task} takes no few-shot examples")
    examples: list[Any] = []
    if shots:
        examples = (read_mc(dev) if task == "mc" else read_gsm8k(dev))[:shots]  # type: ignore[arg-type]
        if len(examples) < shots:
            raise DataError(f"{dev}: {len(examples)} examples, fewer than --shots {shots}")
    max_len = min(max_seq_len, run.model.cfg.max_position_embeddings)
    run.model.eval()
    t0 = time.perf_counter()
    if task == "ppl":
        metrics, items = eval_ppl(run, data, limit, batch_size, max_len)
    elif task == "mc":
        metrics, items = eval_mc(run, data, limit, batch_size, max_len, chat, examples)
    elif task == "gsm8k":
        metrics, items = eval_gsm8k(run, data, limit, batch_size, max_new_tokens, chat, examples)
    elif task == "tools":
        positions = run.model.cfg.max_position_embeddings  # an episode may fill the whole context
        metrics, items = eval_tools(run, data, limit, max_new_tokens, tools, max_turns, positions, batch_size)
    else:
        metrics, items = eval_format(run, data, limit, batch_size, max_new_tokens, chat)
    main_metric = {"ppl": "ppl", "format": "format", "tools": "correct"}.get(task, "accuracy")
    return {
        "task": task,
        "run": str(run_dir) if run_dir else None,
        "stage": run.info.get("stage"),
        "data": str(data),
        "n": len(items),
        "score": metrics[main_metric],
        "metric": main_metric,
        "metrics": metrics,
        "prompt_style": None if task == "ppl" else ("chat" if chat else "plain"),
        "shots": shots,
        "seconds": round(time.perf_counter() - t0, 3),
        "items": items,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short aligned table of the report's headline figures."""
    rows = [(k, str(report[k])) for k in ("task", "run", "data", "n")]
    if report["prompt_style"]:
        rows.append(("prompt", f"{report['prompt_style']}, {report['shots']}-shot"))
    for k, v in report["metrics"].items():
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        rows.append((k, text + ("   <- score" if k == report["metric"] else "")))
    rows.append(("seconds", f"{report['seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---- CLI: minimind eval RUN_DIR --task TASK --data FILE [...] ---------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--task", required=True, choices=TASKS, help="ppl | mc (multiple choice) | gsm8k | format | tools")
    p.add_argument(
        "--data", required=True, metavar="FILE", help="ppl: .jsonl/.txt; mc: .csv/.jsonl; gsm8k, format, tools: .jsonl"
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N items")
    p.add_argument("--out", metavar="REPORT.json", help="write the full report (per-item results) here")
    p.add_argument("--dev", metavar="FILE", help="solved examples for few-shot prompts (mc, gsm8k)")
    p.add_argument("--shots", type=int, default=None, metavar="K", help="few-shot examples (default 5 with --dev)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=512,
        help="ppl: longer documents are cut into windows; mc: longer prompts lose their start",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k/format generation length (tools: per turn)")
    p.add_argument("--tools", default="builtin", metavar="SPEC", help="tools: the tools that run (see minimind agent)")
    p.add_argument("--max-turns", type=int, default=3, help="tools: turns per episode")
    p.add_argument("--prompt-style", choices=["auto", "plain", "chat"], default="auto",
                   help="auto: plain for pretrain/init runs, the chat template otherwise")  # fmt: skip
    p.add_argument("--lora", metavar="DIR", help="apply this LoRA adapter to the run's model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def main(args: Any) -> None:
    from minimind.fileio import atomic_write_text
    from minimind.inference import open_run

    run = open_run(args.run_dir, args.device, args.lora)
    names = ("limit", "batch_size", "max_seq_len", "max_new_tokens", "dev", "shots", "prompt_style", "run_dir")
    names += ("tools", "max_turns")
    report = evaluate(run, args.task, args.data, **{k: getattr(args, k) for k in names})
    if args.lora:
        report["lora"] = str(args.lora)
    print(format_report(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2, ensure_ascii=False))
        print(f"report -> {args.out}")
