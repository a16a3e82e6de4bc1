"""`minimind chat`: answers of a model trained to say known things, history, think display, LoRA."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from minimind import cli
from minimind.chat import Display, Session
from minimind.chatformat import ThinkFilter, split_think
from minimind.checkpoint import init_run, load_run
from minimind.config import TrainConfig, preset
from minimind.data.chat import ChatRows, tokenize_conversations
from minimind.engine import Trainer
from minimind.errors import ConfigError
from minimind.generate import SamplingParams, generate
from minimind.lora import LoRAConfig, inject, save_adapter
from minimind.model import MiniMind

HI = "<think>\nsay hello\n</think>\nHello there!"
BLUE = "<think>\na colour\n</think>\nThe sky is blue."


def conversation(*turns: tuple[str, str]) -> dict:
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"conversations": messages}


@pytest.fixture(scope="module")
def chat_run(tokenizer, tmp_path_factory):
    """A tiny model trained by the real engine until it recites its answers.

    "hi" is answered with reasoning twice as often as without (as mixed SFT data does), so greedy
    decoding thinks by default, and the empty think block of --no-think leads straight to the answer.
    """
    root = tmp_path_factory.mktemp("chat")
    data = [
        conversation(("hi", HI)),
        conversation(("hi", HI)),
        conversation(("hi", "<think>\n\n</think>\n\nHello there!")),
        conversation(("what is blue?", BLUE)),
        conversation(("hi", HI), ("what is blue?", BLUE)),
    ]
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in data))
    torch.manual_seed(0)
    tok = tokenizer
    model = MiniMind(
        preset(
            "tiny",
            hidden_size=64,
            num_layers=2,
            vocab_size=tok.vocab_size,
            pad_token_id=tok.pad_id,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
        )
    )
    rows = ChatRows(tokenize_conversations([path], tok, 128, cache_dir=root / "cache"), 128)
    cfg = TrainConfig(
        out=str(root / "run"), max_seq_len=128, batch_size=2, accumulation=1, lr=3e-3, max_steps=100, warmup_steps=0
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads and suffers when cores are shared
    try:
        Trainer(cfg, model, tok, rows, info={"stage": "sft"}).fit()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    greedy = SamplingParams(max_new_tokens=30, temperature=0, stop_ids=tok.stop_ids)
    for messages, think, expected in [
        ([{"role": "user", "content": "hi"}], None, HI),
        ([{"role": "user", "content": "hi"}], False, "Hello there!"),
        ([{"role": "user", "content": "what is blue?"}], None, BLUE),
    ]:
        ids = tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=think)
        got = tok.decode(generate(model, [ids], greedy).generations[0].tokens[:-1])
        assert got == expected, f"the fixture model did not memorise its data: {got!r}"
    return root / "run"


def minimind(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The real command in its own process (one torch thread: the model is tiny, the cores shared)."""
    return subprocess.run(
        [sys.executable, "-m", "minimind", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def chat_in_process(capsys, monkeypatch, *args, stdin: str = "") -> tuple[str, str]:
    """`minimind chat ...` in this process (no torch import per call): (stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    cli.main(["chat", *map(str, args)])
    out = capsys.readouterr()
    return out.out, out.err


# ---- one answer -------------------------------------------------------------------------------


def test_prompt_prints_the_answer_with_its_reasoning_marked(chat_run):
    proc = minimind("chat", chat_run, "--prompt", "hi", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[think] say hello [/think]\nHello there!\n"


def test_no_think_hides_the_reasoning_but_not_the_answer(chat_run):
    proc = minimind("chat", chat_run, "--prompt", "hi", "--temperature", "0", "--no-think")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello there!\n"


def test_think_opens_the_block_in_the_prompt(chat_run, capsys, monkeypatch):
    """With --think the model starts inside the block (no <think> in its output): still marked."""
    out, _ = chat_in_process(
        capsys, monkeypatch, chat_run, "--prompt", "what is blue?", "--temperature", "0", "--think"
    )
    assert out == "[think] a colour [/think]\nThe sky is blue.\n"


# ---- interactive sessions and history ---------------------------------------------------------


def test_interactive_session_uses_history_and_resets(chat_run):
    stdin = "hi\nwhat is blue?\n/reset\nhi\n/exit\nhi\n"
    proc = minimind("chat", chat_run, "--temperature", "0", "--verbose", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    hi, blue = "[think] say hello [/think]\nHello there!\n", "[think] a colour [/think]\nThe sky is blue.\n"
    assert proc.stdout == hi + blue + hi  # nothing after /exit
    assert "(history cleared)" in proc.stderr
    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tokens, \d+ tokens, [\d.]+ tok/s\]", proc.stderr)]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0] + 10  # the first exchange is in the second prompt
    assert prompts[2] == prompts[0]  # and gone after /reset


def test_history_keeps_the_last_exchanges_that_fit(tokenizer):
    s = Session(tokenizer, max_turns=1)
    s.add("first question", "first answer")
    s.add("second question", "second answer")
    ids, kept = s.prompt("third")
    text = tokenizer.decode(ids)
    assert kept == 1 and "second answer" in text and "first" not in text
    assert text.endswith("<|im_start|>user\nthird<|im_end|>\n<|im_start|>assistant\n")

    full = Session(tokenizer, system="be brief")
    for i in range(4):
        full.add(f"question {i}", f"answer {i}")
    all_ids, kept = full.prompt("next")
    assert kept == 4 and tokenizer.decode(all_ids).startswith("<|im_start|>system\nbe brief<|im_end|>")
    full.budget = len(all_ids) - 1  # one token short: the oldest exchange goes, the system prompt stays
    ids, kept = full.prompt("next")
    text = tokenizer.decode(ids)
    assert kept == 3 and len(ids) <= full.budget and "question 0" not in text and "question 3" in text
    assert text.startswith("<|im_start|>system\nbe brief")
    full.budget = 5  # not even the message alone fits
    with pytest.raises(ConfigError, match="fit in the model.s context"):
        full.prompt("next")


def test_history_stores_reasoning_only_when_thinking(tokenizer):
    hidden = Session(tokenizer, enable_thinking=False)
    hidden.add("hi", "<think>\nsay hello\n</think>\nHello there!")
    assert hidden.history == [("hi", "Hello there!")]
    opened = Session(tokenizer, enable_thinking=True)
    opened.add("hi", "say hello\n</think>\nHello there!")  # the prompt held the <think>
    assert opened.history == [("hi", "<think>\nsay hello\n</think>\nHello there!")]


# ---- splitting and showing reasoning ----------------------------------------------------------


def collect(pieces: list[tuple[str, str]]) -> dict[str, str]:
    out = {"think": "", "answer": ""}
    for kind, text in pieces:
        out[kind] += text
    return out


def test_think_filter_joins_tags_split_across_chunks():
    f = ThinkFilter()
    pieces = []
    for chunk in ["<th", "ink>\nabc</thi", "nk>\nanswer"]:
        new = f.push(chunk)
        assert not any(t in text for _, text in new for t in ("<", "th", "nk>")), new  # no scrap of a tag
        pieces += new
    pieces += f.flush()
    assert collect(pieces) == {"think": "\nabc", "answer": "\nanswer"}


def test_think_filter_is_independent_of_chunking():
    text = "a < b <thin <think>\nplan <b>\n</think>\nso x</th>y</think>z"
    expected = collect(ThinkFilter().push(text))
    assert expected == {"think": "\nplan <b>\n", "answer": "a < b <thin \nso x</th>yz"}  # stray </think> dropped
    for i in range(len(text)):
        for j in range(i, len(text)):
            f = ThinkFilter()
            pieces = f.push(text[:i]) + f.push(text[i:j]) + f.push(text[j:]) + f.flush()
            assert collect(pieces) == expected
            assert all("<think" not in t and "</think" not in t for _, t in pieces)


def test_think_filter_holds_a_possible_tag_until_it_is_decided():
    f = ThinkFilter(in_think=True)
    assert f.push("step 1 </") == [("think", "step 1 ")]
    assert f.push("x") == [("think", "</x")]
    assert f.push("</think>done <") == [("answer", "done ")]
    assert f.flush() == [("answer", "<")]
    assert split_think("<think> why </think> because") == ("why", "because")


def test_display_marks_reasoning_per_output_kind():
    pieces = [
        ("think", "\n"),
        ("think", "plan\n"),
        ("think", "more\n"),
        ("answer", "\n"),
        ("answer", "Hi "),
        ("answer", "you\n"),
    ]
    for tty, show, expected in [
        (False, True, "[think] plan\nmore [/think]\nHi you\n"),
        (True, True, "\033[2mplan\nmore\033[0m\nHi you\n"),
        (False, False, "Hi you\n"),
    ]:
        out = io.StringIO()
        d = Display(out, tty=tty, show_think=show)
        for kind, text in pieces:
            d.write(kind, text)
        d.end()
        assert out.getvalue() == expected


# ---- pretrained-only runs, seeds, LoRA, errors -------------------------------------------------


@pytest.fixture(scope="module")
def text_run(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "run"
    init_run("tiny", tokenizer, path, seed=0, hidden_size=64, num_layers=2)
    return path


def test_pretrained_run_continues_text_without_template(text_run, tokenizer, capsys, monkeypatch):
    ids, kept = Session(tokenizer, chat=False).prompt("Alice lives in")
    assert ids == [tokenizer.bos_id] + tokenizer.encode("Alice lives in") and kept == 0
    user_header = tokenizer.encode("<|im_start|>user")
    assert not any(ids[i : i + len(user_header)] == user_header for i in range(len(ids)))

    out, err = chat_in_process(
        capsys, monkeypatch, text_run, "--max-new-tokens", "4", "--temperature", "0", "--verbose", stdin="Alice\nBob\n"
    )
    assert "init run: no chat template" in err
    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tokens", err)]
    assert prompts == [1 + len(tokenizer.encode("Alice")), 1 + len(tokenizer.encode("Bob"))]  # no history either


def test_seed_makes_sampling_repeatable(text_run, capsys, monkeypatch):
    def sample(seed: int) -> str:
        args = ["--prompt", "Bob", "--max-new-tokens", "12", "--temperature", "1.5", "--top-p", "1", "--seed", seed]
        return chat_in_process(capsys, monkeypatch, text_run, *args)[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_lora_adapter_changes_the_answer(chat_run, tmp_path, capsys, monkeypatch):
    model = load_run(chat_run).model
    cfg = LoRAConfig(rank=4)
    inject(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 1.0)
    save_adapter(model, tmp_path / "adapter", cfg, info={}, metadata={})
    base, _ = chat_in_process(capsys, monkeypatch, chat_run, "--prompt", "hi", "--temperature", "0", "--no-think")
    adapted, _ = chat_in_process(
        capsys,
        monkeypatch,
        chat_run,
        "--prompt",
        "hi",
        "--temperature",
        "0",
        "--no-think",
        "--lora",
        tmp_path / "adapter",
    )
    assert base == "Hello there!\n" and adapted != base

    with pytest.raises(SystemExit) as exit_info:
        chat_in_process(capsys, monkeypatch, chat_run, "--prompt", "hi", "--lora", tmp_path / "missing")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("CheckpointError: ") and "not a LoRA adapter" in err and err.count("\n") == 1
