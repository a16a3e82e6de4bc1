"""Reasoning distillation: only the tag positions of the replies are weighted (token by token), the
loss is normalised by the weights, a few steps make held-out replies follow the format, bad input
is refused, and training resumes exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import _run_cli, sharp_model
from safetensors.torch import load_file

from minimind.cli import build_parser
from minimind.data.batch import IGNORE
from minimind.data.chat import ChatRows, tokenize_conversations
from minimind.errors import ConfigError, DataError
from minimind.stages import reason

TRACE = "<think>\n2 + 3 = 5.\n</think>\n<answer>\n5\n</answer>"


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_only_tag_positions_of_replies_are_weighted(tokenizer, tmp_path):
    """Tags typed by the system or the user are not trained; each tag of each reply weighs W, every other
    reply token 1, everything else 0; the loss divides the weighted sum by the summed weights."""
    conv = [
        {"role": "system", "content": "Think inside <think></think>, answer inside <answer></answer>."},
        {"role": "user", "content": "What is 2 + 3? Use <think>."},
        {"role": "assistant", "content": TRACE},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "<think>\n1 + 1 = 2.\n</think>\n<answer>\n2\n</answer>"},
    ]
    path = write(tmp_path / "r.jsonl", [{"conversations": conv}])
    data = tokenize_conversations([path], tokenizer, 256, tmp_path / "cache")
    tags = reason.tag_sequences(tokenizer)
    assert all(len(t) == 1 for t in tags)  # our tokenizers: one special token per tag
    tag_set = {t[0] for t in tags}
    rows = reason.TagWeightedRows(ChatRows(data, 256, True, tokenizer.pad_id), tags, 7.0)
    batch = rows.batch(np.array([0]))
    ids, trained = data.conversation(0)
    labels, w = batch.labels[0], batch.weights[0]
    n = len(ids) - 1
    for t in range(n):  # label t is token t + 1 of the conversation
        token = int(ids[t + 1])
        expected = 0.0 if not trained[t + 1] else (7.0 if token in tag_set else 1.0)
        assert float(w[t]) == expected, (t, tokenizer.decode([token]), float(w[t]))
    assert torch.all(w[n:] == 0)
    in_prompt = [i for i in range(n) if int(ids[i + 1]) in tag_set and not trained[i + 1]]
    assert len(in_prompt) == 5  # the system's four tags and the user's one: present, not trained
    assert int((w == 7.0).sum()) == 8  # four tags in each of the two replies
    assert batch.loss_units == float(w.sum()) == int((labels != IGNORE).sum()) + 8 * 6

    model = sharp_model(vocab_size=tokenizer.vocab_size).requires_grad_(False)
    loss_sum, _ = reason.weighted_loss(model, batch)
    ce = torch.nn.functional.cross_entropy(model(batch.input_ids).logits[0, :n], labels[:n], reduction="none")
    manual = sum(float(ce[t]) * float(w[t]) for t in range(n) if labels[t] != IGNORE)
    assert float(loss_sum) == pytest.approx(manual, rel=1e-5)


def test_tags_spelled_in_pieces_are_weighted_only_where_whole():
    """A tokenizer without tag tokens (upstream MiniMind2's) spells `<think>` in pieces: only runs of
    pieces that spell a whole tag are weighted, not every `<` or `think` anywhere."""
    think, answer = [11, 12, 13], [11, 14, 13]  # e.g. "<", "think", ">"  and  "<", "answer", ">"
    labels = torch.tensor([[11, 12, 13, 5, 12, 11, 14, 13, 11, 12, IGNORE, 13]])
    got = reason.tag_positions(labels, [think, answer])
    assert got[0].tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]


def test_reason_makes_held_out_replies_follow_the_format(pipeline, tmp_path):
    """From the SFT run (which never saw a trace), a few weighted steps on the demo traces: held-out
    greedy replies go from no <think>/<answer> structure to mostly well-formed."""
    f = pipeline["files"]
    log = _run_cli(
        "reason", "--from", pipeline["sft"], "--data", f["reason"], "--eval-data", f["reason_heldout"],
        "--out", tmp_path / "reason", "--max-steps", 60, "--warmup-steps", 5, "--max-seq-len", 128,
        "--batch-size", 16, "--log-every", 20, "--format-tokens", 64, "--seed", 0,
    )  # fmt: skip
    shares = [int(x) for x in re.findall(r"format (\d+)% of", log)]
    assert len(shares) == 2, log
    before, after = shares
    assert before <= 10 and after >= 60, log
    assert "weighted x10" in log  # the default tag weight
    info = json.loads((tmp_path / "reason" / "run.json").read_text())
    assert info["stage"] == "reason" and info["reason"] == {"tag_weight": 10.0, "format_tokens": 64}


def reason_argv(pipeline, out, *extra, data=None) -> list[str]:
    argv = ["reason", "--from", pipeline["sft"], "--data", data or pipeline["files"]["reason"], "--out", out]
    return [str(a) for a in argv + ["--max-seq-len", 128, "--batch-size", 8, "--seed", 0, *extra]]


def args_for(pipeline, out, *extra, data=None):
    return build_parser("reason").parse_args(reason_argv(pipeline, out, *extra, data=data))


def test_reason_resume_is_bitwise_exact(pipeline, tmp_path):
    """8 steps straight == 4 steps, killed, `--resume` without --tag-weight (restored from run.json)."""
    data = tmp_path / "r.jsonl"
    data.write_text("".join(pipeline["files"]["reason"].read_text().splitlines(keepends=True)[:80]))
    extra = ["--max-steps", 8, "--warmup-steps", 2, "--log-every", 4, "--tag-weight", 3]
    _run_cli(*reason_argv(pipeline, tmp_path / "straight", *extra, data=data))
    trainer, _ = reason.prepare(args_for(pipeline, tmp_path / "split", *extra, data=data))
    while trainer.step < 4:
        trainer.train_step()
    trainer.save()  # the process dies here
    log = _run_cli("reason", "--out", tmp_path / "split", "--resume", "--data", data, "--seed", 0)
    assert "resuming at step 4" in log and "weighted x3" in log
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused(pipeline, tmp_path):
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    plain = write(tmp_path / "plain.jsonl", [{"conversations": hello}] * 20)
    with pytest.raises(DataError, match="no <think>/</think>/<answer>/</answer> tags"):
        reason.prepare(args_for(pipeline, tmp_path / "a", data=plain))
    with pytest.raises(ConfigError, match="--tag-weight must be positive"):
        reason.prepare(args_for(pipeline, tmp_path / "b", "--tag-weight", 0))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"conversations": [{"role": "user", "content": "q"}]}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:1: "):
        reason.prepare(args_for(pipeline, tmp_path / "c", data=broken))
