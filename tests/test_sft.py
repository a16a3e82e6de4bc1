"""SFT: the loss mask, truncation, packing, bad input, and that SFT measurably teaches answering."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import _run_cli, sharp_model

from minimind.data.batch import IGNORE
from minimind.data.chat import ChatRows, encode_conversations, render, tokenize_conversations
from minimind.engine import lm_loss
from minimind.errors import DataError

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Where does Mia live?"},
    {"role": "assistant", "content": "Mia lives in Oakvale."},
    {"role": "user", "content": "小明养了什么？"},
    {"role": "assistant", "content": "小明养了一只猫。\n就这样。"},
    {"role": "user", "content": "And 2 + 3?"},
    {"role": "assistant", "content": "\n\n 2 + 3 = 5.  "},
]


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_mask_covers_exactly_the_assistant_replies(tokenizer):
    text = render(CONV)
    assert text + "\n" == tokenizer.render_chat(CONV)  # the template's own rendering
    ids, trained, cut = encode_conversations(tokenizer, [CONV])[0]
    assert not cut and tokenizer.decode(ids) == text
    # What precedes each reply is exactly the prompt chat/eval build for generation.
    starts = [i for i in range(1, len(ids)) if trained[i] and not trained[i - 1]]
    for k, start in zip((2, 4, 6), starts, strict=True):
        assert ids[:start].tolist() == tokenizer.encode_chat(CONV[:k], add_generation_prompt=True)
    # Token by token: the trained runs decode to exactly each reply plus its <|im_end|>, in order.
    runs, current = [], []
    for t, m in zip(ids.tolist(), trained.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs.append(current) if current else None
    replies = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert [tokenizer.decode(r) for r in runs] == [r + "<|im_end|>" for r in replies]
    untrained = tokenizer.decode([t for t, m in zip(ids.tolist(), trained.tolist()) if not m])
    for m in CONV:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    assert untrained.count("<|im_start|>assistant\n") == 3  # headers are never learned


def test_truncation_drops_whole_later_turns(tokenizer):
    ids, trained, _ = encode_conversations(tokenizer, [CONV])[0]
    eos = tokenizer.eos_id
    ends = [i + 1 for i, t in enumerate(ids.tolist()) if t == eos and trained[i]]
    cut_ids, cut_trained, cut = encode_conversations(tokenizer, [CONV], max_len=ends[1] + 3)[0]
    assert cut and len(cut_ids) == ends[1] and cut_ids[-1] == eos and cut_trained[-1]
    assert encode_conversations(tokenizer, [CONV], max_len=ends[0] - 1) == [None]  # first reply does not fit


def test_tokenize_reports_truncated_and_dropped(tokenizer, tmp_path):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, trained, _ = encode_conversations(tokenizer, [CONV])[0]
    second_end = [i + 1 for i, t in enumerate(ids.tolist()) if t == tokenizer.eos_id and trained[i]][1]
    seq = second_end + 2  # CONV keeps two of its three exchanges
    too_long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * seq}]
    records = [{"conversations": c} for c in (CONV, short, too_long)]
    f = write(tmp_path / "a.jsonl", records)
    data = tokenize_conversations([f], tokenizer, max_seq_len=seq, cache_dir=tmp_path / "c")
    assert (len(data), data.truncated, data.dropped) == (2, 1, 1)
    assert len(data.conversation(0)[0]) == second_end
    assert "1 truncated" in data.report() and "1 dropped" in data.report()
    again = tokenize_conversations([f], tokenizer, max_seq_len=seq, cache_dir=tmp_path / "c")
    assert again.reused and np.array_equal(np.asarray(again.tokens), np.asarray(data.tokens))
    assert (again.truncated, again.dropped) == (1, 1)


def test_packed_and_padded_rows_give_the_same_loss(tokenizer, tmp_path):
    from minimind.data.demo import sft_records

    f = write(tmp_path / "s.jsonl", sft_records(40, seed=3))
    data = tokenize_conversations([f], tokenizer, max_seq_len=256, cache_dir=tmp_path / "c")
    packed, padded = ChatRows(data, 256, packed=True), ChatRows(data, 256, packed=False)
    assert len(packed) < len(padded) / 2 and packed.fill > 0.8 > 0.4 > padded.fill
    model = sharp_model(vocab_size=tokenizer.vocab_size)

    def total(rows):
        batch = rows.batch(np.arange(len(rows)))
        loss, _ = lm_loss(model, batch)
        return loss.double(), batch.num_tokens

    (a, n_a), (b, n_b) = total(packed), total(padded)
    assert n_a == n_b == int(sum(data.conversation(i)[1][1:].sum() for i in range(len(data))))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    # Every conversation lands in exactly one packed row, each as its own segment.
    placed = sorted(int(c) for r in range(len(packed)) for c in packed.row(r))
    assert placed == list(range(len(data)))
    batch = packed.batch(np.arange(1))
    assert (batch.labels[batch.segment_ids == len(packed.row(0))] == IGNORE).all()  # padding learns nothing


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [{"role": "bot", "content": "x"}]}', "message 1 has role 'bot'"),
        ('{"conversations": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}', "empty"),
        ('{"conversations": [{"role": "user", "content": "q"}]}', "ends on a user turn"),
        (
            '{"conversations": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}',
            "message 2 is user, expected assistant",
        ),
        ('{"messages": []}', "missing 'conversations'"),
        ('{"conversations": "hello"}', "is a str, not a list"),
        ('{"conversations": [{"role": "user", "content": 3}]}', "no string 'content'"),
        ('{"conversations": [', "invalid JSON"),
        (
            '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|>b"}]}',
            "contains the control token <\\|im_end\\|>",
        ),
    ],
)
def test_bad_conversations_name_file_and_line(tokenizer, tmp_path, line, message):
    good = '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    f = tmp_path / "bad.jsonl"
    f.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        tokenize_conversations([f], tokenizer, 64, tmp_path / "c")


def test_real_world_quirks_are_accepted(tokenizer, tmp_path):
    line = json.dumps(
        {"id": 7, "conversations": [{"role": "user", "content": "q", "x": 1}, {"role": "assistant", "content": "a"}]}
    )
    f = tmp_path / "quirks.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (line + "\r\n").encode() * 2)
    assert len(tokenize_conversations([f], tokenizer, 64, tmp_path / "c")) == 2


def test_show_mask_marks_only_replies(pipeline, tmp_path):
    out = _run_cli(
        "sft", "--from", pipeline["pretrain"], "--data", pipeline["files"]["sft"], "--out", tmp_path / "x",
        "--show-mask", 1, "--max-seq-len", 128, "--cache-dir", tmp_path / "c",
    )  # fmt: skip
    first = json.loads(pipeline["files"]["sft"].read_text(encoding="utf-8").splitlines()[0])["conversations"]
    for m in first:
        marked = f"[[{m['content']}<|im_end|>]]"
        assert (marked in out) == (m["role"] == "assistant")
    assert not (tmp_path / "x").exists()  # inspecting trains nothing


def test_sft_teaches_answering_held_out_questions(pipeline):
    from minimind.checkpoint import load_run
    from minimind.data.chat import iter_conversations
    from minimind.demo import answer_accuracy

    held = list(iter_conversations([pipeline["files"]["sft_heldout"]]))
    base, sft = load_run(pipeline["pretrain"]), load_run(pipeline["sft"])
    before, _ = answer_accuracy(base.model, base.tokenizer, held)
    after, answers = answer_accuracy(sft.model, sft.tokenizer, held)
    assert before < 0.05 and after > 0.25, (before, after, answers[:5])
    log = pipeline["logs"]["sft"]
    loss_before = float(log.split("held-out loss before: ")[1].split()[0])
    loss_after = float(log.split("held-out loss after: ")[1].split()[0])
    assert loss_after < 0.5 * loss_before
    info = json.loads((pipeline["sft"] / "run.json").read_text())
    assert info["stage"] == "sft" and info["preset"] == "tiny" and info["train_config"]["lr"] == 2e-3
