"""`minimind eval`: answer extraction, multiple choice and GSM8K on a model forced to know the
answers, perplexity against a plain forward pass, bad input, and the command end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_model

from minimind.checkpoint import Run, load_run
from minimind.config import ModelConfig, TrainConfig
from minimind.data.chat import ChatRows, encode_conversations, tokenize_conversations
from minimind.data.demo import pretrain_texts, sft_records, write_jsonl
from minimind.engine import Trainer
from minimind.errors import DataError
from minimind.eval import evaluate, extract_number, same_number, score_options
from minimind.model import MiniMind

COLOURS = ["red", "blue", "green", "white"]
MC = [  # (question, correct index): every answer is a colour, so only the question tells them apart
    ("What colour is the sky?", 1),
    ("What colour is the leaf?", 2),
    ("What colour is the snow?", 3),
    ("What colour is the apple?", 0),
]
MATH = [
    ("Ben has 3 birds. Eva has 4. How many birds?", "3 + 4 = 7.\n#### 7"),
    ("What is 12 + 24?", "12 + 24 = 36.\n#### 36"),
]


def model_config(tokenizer) -> ModelConfig:
    return ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
    )


def write_mc_files(root):
    csv_text = "id,Question,A,B,C,D,Answer\n" + "".join(
        f'{i},"{q}",{",".join(COLOURS)},{"ABCD"[a]}\n' for i, (q, a) in enumerate(MC)
    )
    (root / "mc.csv").write_text(csv_text, encoding="utf-8")
    write_jsonl(root / "mc.jsonl", [{"question": q, "choices": COLOURS, "answer": a} for q, a in MC])
    write_jsonl(root / "gsm8k.jsonl", [{"question": q, "answer": a} for q, a in MATH])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, and on a busy 2-core
    machine OpenMP's spin-waiting made training 10-30x slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def forced(tokenizer, tmp_path_factory, one_thread):
    """A run trained (with the real engine) on conversations that state the right answers."""
    root = tmp_path_factory.mktemp("eval")
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": COLOURS[a]}] for q, a in MC]
    convs += [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in MATH]
    write_jsonl(root / "train.jsonl", [{"conversations": c} for c in convs] * 4)
    rows = ChatRows(tokenize_conversations([root / "train.jsonl"], tokenizer, 64, root / "cache"), 64)
    torch.manual_seed(0)
    cfg = TrainConfig(
        out=str(root / "run"),
        max_seq_len=64,
        batch_size=8,
        accumulation=1,
        lr=3e-3,
        max_steps=120,
        warmup_steps=0,
        log_every=1000,
        device="cpu",
    )
    Trainer(cfg, MiniMind(model_config(tokenizer)), tokenizer, rows, info={"stage": "sft"}).fit()
    write_mc_files(root)
    return root


def untrained(tokenizer, stage="sft") -> Run:
    torch.manual_seed(0)
    return Run(MiniMind(model_config(tokenizer)).eval(), tokenizer, {"stage": stage})


# ---- GSM8K answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
            "altogether in April and May.\n#### 72",
            "72",
        ),
        ("She pays 3 * 5 = 15 dollars.\n#### 1,000", "1000"),
        ("#### $1,234,567.\nQuestion: next one is 5", "1234567"),
        ("<think>\n2 - 5.5 = -3.5\n</think>\n<answer>\n-3.5\n</answer>", "-3.5"),
        ("<answer>x = 5 - 3 = 2</answer> and later 99", "2"),
        ("So 10 - 4 = 6, the answer is $18.", "18"),
        ("It fell to −4 degrees", "-4"),
        ("I do not know the answer.", None),
        ("#### (no number here) but 12 appeared before", "12"),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_compare_as_numbers():
    assert same_number("72.0", "72") and same_number("-3.50", "-3.5") and same_number("1,000", "1000")
    assert not same_number("72", "27") and not same_number(None, "72") and not same_number("7.2", "72")


# ---- multiple choice --------------------------------------------------------------------------------


def test_mc_forced_model_is_right_in_csv_and_jsonl(forced):
    run = load_run(forced / "run")
    assert run.info["stage"] == "sft"
    for name in ("mc.csv", "mc.jsonl"):
        report = evaluate(run, "mc", forced / name, run_dir=forced / "run")
        assert report["n"] == len(MC) and report["score"] == 1.0, [r["scores"] for r in report["items"]]
        assert report["metrics"]["accuracy_norm"] == 1.0 and report["metrics"]["chance"] == 0.25
        assert [r["reference"] for r in report["items"]] == ["BCDA"[i] for i in range(4)]
        assert report["prompt_style"] == "chat"
        assert (
            report["items"][0]["prompt"]
            == "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n"
        )
    # The scores come from the model: an untrained one gives other numbers and is not always right.
    trained = evaluate(run, "mc", forced / "mc.jsonl")
    fresh = evaluate(untrained(run.tokenizer), "mc", forced / "mc.jsonl")
    assert all(
        abs(a - b) > 0.1 for x, y in zip(trained["items"], fresh["items"]) for a, b in zip(x["scores"], y["scores"])
    )
    assert fresh["score"] < 1.0


def test_score_options_is_the_sum_of_option_token_logprobs(tokenizer):
    """Batched, right-padded scoring equals scoring each (prompt, option) alone by hand."""
    model = sharp_model(vocab_size=tokenizer.vocab_size)
    pairs = [("What colour is the sky?", ["blue", "a very long answer about green things"]), ("Hi", ["red"])]
    for chat in (True, False):
        got = score_options(model, tokenizer, pairs, chat=chat, batch_size=2)
        for (prompt, options), row in zip(pairs, got):
            for option, (score, n) in zip(options, row):
                if chat:
                    p = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
                    c = tokenizer.encode(option) + [tokenizer.eos_id]
                else:
                    p, c = [tokenizer.bos_id] + tokenizer.encode(prompt), tokenizer.encode(option)
                x = torch.tensor(p + c)
                with torch.no_grad():
                    logp = model(x[None]).logits[0, :-1].log_softmax(-1).gather(-1, x[1:, None]).squeeze(-1)
                assert n == len(c)
                assert score == pytest.approx(float(logp[-len(c) :].sum()), rel=1e-5)


def test_mc_few_shot_and_plain_prompts(forced, tmp_path):
    run = load_run(forced / "run")
    write_jsonl(
        tmp_path / "dev.jsonl", [{"question": "What colour is coal?", "choices": ["black", "pink"], "answer": "A"}]
    )
    zero = evaluate(run, "mc", forced / "mc.csv")
    one = evaluate(run, "mc", forced / "mc.csv", dev=tmp_path / "dev.jsonl", shots=1)
    shot = "<|im_start|>user\nWhat colour is coal?<|im_end|>\n<|im_start|>assistant\nblack<|im_end|>\n"
    assert one["shots"] == 1 and one["items"][0]["prompt"].startswith(shot)
    assert "coal" not in zero["items"][0]["prompt"]
    assert one["items"][0]["scores"] != zero["items"][0]["scores"]
    # A pretrain run gets plain text: "Question: ...\nAnswer:" with the solved example before it.
    plain = evaluate(
        untrained(run.tokenizer, stage="pretrain"), "mc", forced / "mc.csv", dev=tmp_path / "dev.jsonl", shots=1
    )
    assert plain["prompt_style"] == "plain"
    assert plain["items"][0]["prompt"] == (
        "Question: What colour is coal?\nAnswer: black\n\nQuestion: What colour is the sky?\nAnswer:"
    )


def test_mc_csv_header_variants(tmp_path, tokenizer):
    """Lower-case header, CMMLU's unnamed index column, a quoted multi-line question, five options."""
    (tmp_path / "a.csv").write_text(
        ',question,a,b,c,d,e,answer\n0,"Two\nlines?",x,y,z,w,v,e\n1,Q2,x,y,z,w,v,B\n', encoding="utf-8"
    )
    report = evaluate(untrained(tokenizer), "mc", tmp_path / "a.csv")
    items = report["items"]
    assert [i["question"] for i in items] == ["Two\nlines?", "Q2"] and [i["reference"] for i in items] == ["E", "B"]
    assert items[1]["where"].endswith("a.csv:4") and report["metrics"]["chance"] == pytest.approx(0.2)


# ---- perplexity ---------------------------------------------------------------------------------------


def direct_nll(model, seqs_and_masks):
    """Sum of cross-entropies of the scored targets, one plain forward pass per sequence."""
    total, count = 0.0, 0
    for ids, scored in seqs_and_masks:
        x = torch.tensor(ids)
        with torch.no_grad():
            ce = F.cross_entropy(model(x[None]).logits[0, :-1], x[1:], reduction="none")
        total += float(ce[torch.as_tensor(scored)].double().sum())
        count += int(sum(scored))
    return total, count


def test_ppl_pretrain_matches_a_plain_forward_pass(tokenizer, tmp_path):
    model = sharp_model(vocab_size=tokenizer.vocab_size)
    texts = pretrain_texts(7, seed=3) + ["你好，世界。"]
    write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    report = evaluate(Run(model, tokenizer, {"stage": "pretrain"}), "ppl", tmp_path / "p.jsonl", batch_size=3)
    seqs = [[tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id] for t in texts]
    total, count = direct_nll(model, [(s, [True] * (len(s) - 1)) for s in seqs])
    m = report["metrics"]
    assert report["n"] == len(texts) and m["format"] == "pretrain" and m["tokens"] == count
    assert m["nll"] == pytest.approx(total / count, rel=1e-5) and report["score"] == pytest.approx(math.exp(m["nll"]))
    nbytes = sum(len(t.encode()) for t in texts)
    assert m["bytes"] == nbytes and m["bpb"] == pytest.approx(total / math.log(2) / nbytes, rel=1e-5)
    # Documents longer than max_seq_len are cut into windows overlapping by one token: same targets,
    # each window scored from its own start.
    cut = evaluate(Run(model, tokenizer, {}), "ppl", tmp_path / "p.jsonl", max_seq_len=8, limit=3)
    pieces = [(s[i : i + 9], [True] * (len(s[i : i + 9]) - 1)) for s in seqs[:3] for i in range(0, len(s) - 1, 8)]
    total, count = direct_nll(model, pieces)
    assert cut["n"] == 3 and cut["metrics"]["tokens"] == count == sum(len(s) - 1 for s in seqs[:3])
    assert cut["metrics"]["nll"] == pytest.approx(total / count, rel=1e-5)
    # .txt (one document per line) is read as pretraining text too.
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    as_txt = evaluate(Run(model, tokenizer, {}), "ppl", tmp_path / "p.txt")
    assert as_txt["metrics"]["nll"] == pytest.approx(report["metrics"]["nll"], rel=1e-6)


def test_ppl_sft_counts_only_assistant_tokens(tokenizer, tmp_path):
    model = sharp_model(vocab_size=tokenizer.vocab_size)
    records = sft_records(6, seed=5)
    write_jsonl(tmp_path / "s.jsonl", records)
    report = evaluate(Run(model, tokenizer, {}), "ppl", tmp_path / "s.jsonl", batch_size=4)
    convs = [r["conversations"] for r in records]
    encoded = [(ids.tolist(), trained[1:].tolist()) for ids, trained, _ in encode_conversations(tokenizer, convs)]
    total, count = direct_nll(model, encoded)
    m = report["metrics"]
    assert m["format"] == "sft" and m["tokens"] == count == sum(sum(t) for _, t in encoded)
    assert m["nll"] == pytest.approx(total / count, rel=1e-5)
    assert m["bytes"] == sum(len(x["content"].encode()) for c in convs for x in c if x["role"] == "assistant")


# ---- GSM8K ----------------------------------------------------------------------------------------------


def test_gsm8k_forced_model_scores_one_untrained_lower(forced):
    run = load_run(forced / "run")
    report = evaluate(run, "gsm8k", forced / "gsm8k.jsonl", max_new_tokens=24)
    assert report["score"] == 1.0, [r["output"] for r in report["items"]]
    assert [r["prediction"] for r in report["items"]] == ["7", "36"]
    assert report["items"][0]["output"] == MATH[0][1]  # the stop token ended it, and is not shown
    fresh = evaluate(untrained(run.tokenizer), "gsm8k", forced / "gsm8k.jsonl", max_new_tokens=24)
    assert fresh["score"] < 1.0


def test_gsm8k_plain_prompt_reference_forms_and_stop_at_next_question(tokenizer, tmp_path, monkeypatch):
    """Pretrain runs get "Question: ...\\nAnswer:"; a continuation that goes on to invent the next
    question is cut there; a reference may be "#### N", a bare number or a JSON number."""
    import minimind.generate as gen

    seen = []

    def fake_generate(model, prompts, params):
        seen.append((prompts, params))
        reply = tokenizer.encode(" 1,000 apples.\nQuestion: What is 2 + 2?\nAnswer: 4") + [tokenizer.eos_id]
        return gen.GenerateOutput([gen.Generation(reply, [0.0] * len(reply), "stop")] * len(prompts), 0, 0, 0, 0)

    monkeypatch.setattr(gen, "generate", fake_generate)
    rows = [{"question": "q1", "answer": "5 * 200 = 1000\n#### 1,000"}, {"question": "q2", "answer": " $1000. "}]
    write_jsonl(tmp_path / "g.jsonl", rows + [{"question": "q3", "answer": 4}])
    report = evaluate(untrained(tokenizer, stage="pretrain"), "gsm8k", tmp_path / "g.jsonl", batch_size=2)
    assert [r["reference"] for r in report["items"]] == ["1000", "1000", "4"]
    assert [r["prediction"] for r in report["items"]] == ["1000"] * 3 and report["score"] == pytest.approx(2 / 3)
    assert report["items"][0]["prompt"] == "Question: q1\nAnswer:" and report["items"][0]["output"] == " 1,000 apples."
    assert [len(p) for p, _ in seen] == [2, 1] and seen[0][1].temperature == 0
    assert seen[0][0][0] == [tokenizer.bos_id] + tokenizer.encode("Question: q1\nAnswer:")


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, name, content, message",
    [
        ("mc", "m.csv", "Question,A,B,Answer\nq,x,y,A\nq,x,y\n", "m.csv:3: 3 columns, expected 4"),
        ("mc", "m.csv", 'Question,A,B,Answer\n"multi\nline",x,y,A\nq,x,y,C\n', "m.csv:4: answer 'C' is not among"),
        ("mc", "m.csv", "Question,Answer\nq,A\n", "m.csv:1: header needs Question"),
        (
            "mc",
            "m.jsonl",
            '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "answer": 1}\n',
            "m.jsonl:2: 'choices' must be a list",
        ),
        ("mc", "m.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "m.jsonl:1: 'answer' must be"),
        ("mc", "m.jsonl", '{"choices": ["a", "b"], "answer": "B"}\n', "m.jsonl:1: 'question' is missing"),
        ("mc", "m.jsonl", '{"question": "q", "choices": ["a", "b"]}\n', "m.jsonl:1: 'answer' must be"),
        (
            "gsm8k",
            "g.jsonl",
            '{"question": "q", "answer": "#### 5"}\n{"question": "q", "answer": "five"}\n',
            "g.jsonl:2: no number in 'answer'",
        ),
        ("ppl", "p.jsonl", '{"prompt": "x"}\n', "p.jsonl:1: expected"),
        ("ppl", "missing.jsonl", None, "missing.jsonl: no such file"),
    ],
)
def test_bad_input_names_file_and_line(tokenizer, tmp_path, task, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)):
        evaluate(untrained(tokenizer), task, tmp_path / name)


# ---- the command ------------------------------------------------------------------------------------------


def minimind(*args):
    cmd = [sys.executable, "-m", "minimind", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(forced, tmp_path):
    proc = minimind("eval", forced / "run", "--task", "mc", "--data", forced / "mc.csv", "--out", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "mc" and report["n"] == 4 and report["score"] == 1.0
    assert report["run"] == str(forced / "run") and len(report["items"]) == 4
    assert "accuracy" in proc.stdout and "<- score" in proc.stdout
    (tmp_path / "bad.csv").write_text("Question,A,B,Answer\nq,x,y,A\nq,x,y,Z\n", encoding="utf-8")
    # The whole file is validated, even with --limit.
    proc = minimind("eval", forced / "run", "--task", "mc", "--data", tmp_path / "bad.csv", "--limit", "1")
    assert proc.returncode == 2 and f"DataError: {tmp_path / 'bad.csv'}:3: answer 'Z'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lora_adapter_changes_the_scores(forced, tmp_path):
    """--lora DIR evaluates base + adapter: a non-zero update moves every option's score."""
    from minimind.cli import main
    from minimind.lora import LoRAConfig, inject, save_adapter

    run, cfg = load_run(forced / "run"), LoRAConfig(rank=2, targets=["o_proj", "down_proj"])
    inject(run.model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    save_adapter(run.model, tmp_path / "adapter", cfg, {}, {})
    common = ["eval", forced / "run", "--task", "mc", "--data", forced / "mc.jsonl"]
    main([*map(str, common), "--out", str(tmp_path / "base.json")])
    main([*map(str, common), "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora.json")])
    base, lora = (json.loads((tmp_path / f).read_text()) for f in ("base.json", "lora.json"))
    assert lora["lora"] == str(tmp_path / "adapter")
    assert all(a != b for x, y in zip(base["items"], lora["items"]) for a, b in zip(x["scores"], y["scores"]))
