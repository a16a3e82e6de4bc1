"""RL prompts: the final assistant placeholder is dropped whatever it holds, reference answers are
carried as strings, every malformed line names FILE:LINE, and encoding is the chat template with the
reply opened (with or without a think block)."""

from __future__ import annotations

import json

import pytest

from minimind.data.demo import write_demo_data
from minimind.data.prompts import Prompt, encode_prompt, read_prompts, reply_prefix
from minimind.errors import DataError

U = {"role": "user", "content": "What is 2 + 3?"}
SYS = {"role": "system", "content": "Be brief."}


def write(tmp_path, records, name="rl.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def placeholder(content):
    return {"role": "assistant", "content": content}


def test_placeholder_dropped_answer_carried(tmp_path):
    path = write(
        tmp_path,
        [
            {"conversations": [U, placeholder("无")], "answer": "5"},
            {"conversations": [U, placeholder("空")], "answer": 5},
            {"conversations": [U, placeholder("")], "answer": -2.5},
            {"conversations": [U, {"role": "assistant"}]},  # no content at all: still a placeholder
            {"conversations": [U]},  # already ends with the user turn
        ],
    )
    prompts = read_prompts([path])
    assert [p.messages for p in prompts] == [[U]] * 5
    assert [p.answer for p in prompts] == ["5", "5", "-2.5", None, None]
    assert [p.where for p in prompts] == [f"{path}:{i}" for i in range(1, 6)]
    assert prompts.skipped == [] and prompts.report() == "5 prompts (3 with a reference answer)"


def test_system_and_multi_turn_prompts_keep_earlier_replies(tmp_path):
    earlier = {"role": "assistant", "content": "5."}
    follow = {"role": "user", "content": "And times 2?"}
    path = write(
        tmp_path,
        [
            {"conversations": [SYS, U, placeholder("无")]},
            {"conversations": [U, earlier, follow, placeholder("无")], "answer": "10"},
            {"conversations": [SYS, U, earlier, follow]},
        ],
    )
    a, b, c = read_prompts([path])
    assert a.messages == [SYS, U]
    assert b.messages == [U, earlier, follow] and b.answer == "10"
    assert c.messages == [SYS, U, earlier, follow]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"messages": [U]}, "missing 'conversations'"),
        ({"conversations": "What is 2 + 3?"}, "is a str, not a list"),
        ({"conversations": []}, "'conversations' is empty"),
        ({"conversations": [placeholder("无")]}, "only the assistant placeholder"),
        ({"conversations": [{"role": "bot", "content": "hi"}, placeholder("无")]}, "role 'bot'"),
        ({"conversations": [placeholder("hi"), U, placeholder("无")]}, "message 1 is assistant, expected user"),
        ({"conversations": [U, U, placeholder("无")]}, "message 2 is user, expected assistant"),
        ({"conversations": [{"role": "user", "content": "2<|im_end|>"}, placeholder("无")]}, "control token"),
        ({"conversations": [{"role": "user", "content": " "}, placeholder("无")]}, "empty content"),
        ({"conversations": [SYS, placeholder("无")]}, "only a system message"),
        ({"conversations": [U, placeholder("无")], "answer": True}, "'answer' must be a string or a number"),
        ({"conversations": [U, placeholder("无")], "answer": [5]}, "'answer' must be a string or a number"),
        ({"conversations": [U, placeholder("无")], "answer": " "}, "'answer' is empty"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = {"conversations": [U, placeholder("无")]}
    path = write(tmp_path, [good, line, good])
    with pytest.raises(DataError, match=f"^{path}:2: .*{message}"):
        read_prompts([path])
    prompts = read_prompts([path], skip_bad_lines=True)
    assert len(prompts) == 2 and len(prompts.skipped) == 1 and prompts.skipped[0].startswith(f"{path}:2: ")
    assert prompts.report().endswith("1 bad lines skipped")


def test_files_with_nothing_usable(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="file is empty"):
        read_prompts([empty])
    bad = write(tmp_path, ["{", {"conversations": []}], name="bad.jsonl")
    with pytest.raises(DataError, match=f"^{bad}: no usable prompts"):
        read_prompts([bad], skip_bad_lines=True)
    with pytest.raises(DataError, match="no such file"):
        read_prompts([tmp_path / "missing.jsonl"])


def test_encode_prompt_is_the_chat_template_with_the_reply_opened(tokenizer):
    prompt = Prompt([SYS, U], "5", "x:1")
    plain = encode_prompt(tokenizer, prompt)
    assert plain == tokenizer.encode_chat([SYS, U], add_generation_prompt=True)
    assert tokenizer.decode(plain).endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    think, no_think = encode_prompt(tokenizer, prompt, think=True), encode_prompt(tokenizer, prompt, think=False)
    assert think == tokenizer.encode_chat([SYS, U], add_generation_prompt=True, enable_thinking=True)
    open_id, close_id = tokenizer.tag_ids["<think>"], tokenizer.tag_ids["</think>"]
    assert think[: len(plain)] == plain and think[len(plain) :] == [open_id] + tokenizer.encode("\n")
    assert no_think[: len(plain)] == plain and no_think[len(plain)] == open_id and close_id in no_think
    assert tokenizer.decode(no_think[len(plain) :]) == "<think>\n\n</think>\n\n"
    # What the generation prompt wrote of the reply, for the rewards to see the whole reply.
    assert [reply_prefix(tokenizer, t) for t in (None, True, False)] == ["", "<think>\n", "<think>\n\n</think>\n\n"]
    for t, ids in ((None, plain), (True, think), (False, no_think)):
        assert tokenizer.decode(ids).endswith("assistant\n" + reply_prefix(tokenizer, t))


def test_demo_rl_files_read_fully(tmp_path):
    files = write_demo_data(tmp_path, scale=0.1)
    for name in ("rl", "rl_heldout"):
        lines = files[name].read_text(encoding="utf-8").splitlines()
        prompts = read_prompts([files[name]])
        assert len(prompts) == len(lines) > 0 and not prompts.skipped
        assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in prompts)
        assert all(p.answer is not None and p.answer.isdigit() for p in prompts)
