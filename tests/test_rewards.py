"""Rewards: each rule on hand-made replies, `--reward` specs add up to the hand-computed weighted sum,
bad specs are ConfigErrors, and the reward-model terms score exactly what a direct call scores (ours
through `score`, a Hugging Face model through a plain transformers forward), clipped as asked."""

from __future__ import annotations

import doctest

import pytest
import torch
from conftest import tiny_config

import minimind.rl.rewards as rewards
from minimind.checkpoint import save_run
from minimind.data.chat import encode_conversations
from minimind.data.prompts import Prompt
from minimind.errors import ConfigError, DataError
from minimind.losses import bradley_terry_loss
from minimind.model import MiniMind
from minimind.reward_model import RewardModel, load_reward_model, score
from minimind.rl.rewards import (
    final_answer,
    format_reward,
    length_penalty,
    math_reward,
    parse_reward,
    repetition_penalty,
)


def ask(question: str, answer: str | None = None, where: str = "rl.jsonl:1") -> Prompt:
    return Prompt([{"role": "user", "content": question}], answer, where)


def test_docstring_examples():
    assert doctest.testmod(rewards).failed == 0


def test_math_reads_the_final_answer():
    assert math_reward("3 + 4 = 7", "7") == 1.0 and math_reward("3 + 4 = 8", "7") == 0.0
    # <answer> beats the last number; without one the last number counts.
    assert math_reward("<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>\nI used 2 steps.", "7") == 1.0
    assert math_reward("<think>\n3 + 4 = 7\n</think>\n<answer>\n8\n</answer>\nno, 7", "7") == 0.0
    assert math_reward("The last <answer>1</answer> counts: <answer>7</answer>", "7") == 1.0
    assert math_reward("<answer>seven</answer> 7", "7") == 0.0  # an answer block without a number
    assert math_reward("5 - 12 = -7", "-7") == 1.0 and math_reward("5 - 12 = 7", "-7") == 0.0
    assert math_reward("3加4等于7。", "7") == 1.0 and math_reward("3加4等于8。", "7") == 0.0
    assert math_reward("答案：<answer>１２</answer>", "12") == 1.0  # full-width digits are digits too
    assert math_reward("It costs $1,250.", "1250") == 1.0 and math_reward("1250", "1,250") == 1.0
    assert math_reward("x = 3.50", "3.5") == 1.0 and math_reward("72.0", "72") == 1.0
    assert math_reward("no number at all", "0") == 0.0
    assert math_reward("48 + 24 = 72", "48 + 24 = <<48+24=72>>72\n#### 72") == 1.0  # a GSM8K solution
    assert final_answer("5-3") == "3"  # a dash between digits is an operator, not a sign


def test_format_gives_partial_credit():
    full = "<think>\n2 + 2 = 4\n</think>\n<answer>\n4\n</answer>"
    assert format_reward(full) == 1.0
    assert format_reward("<think>\n\n</think>\n<answer>\n4\n</answer>") == 0.5  # empty think: tags only
    assert format_reward("<think>\nhm\n</think>\n<answer>\n4") == 0.375
    assert format_reward(full + "<answer>5</answer>") == 0.25  # </answer> twice: not the format either
    assert format_reward("just 4") == 0.0 and format_reward("") == 0.0
    assert format_reward("<think>\n" + full.removeprefix("<think>\n")) == 1.0  # prefix + completion


def test_length_and_repetition_penalties():
    assert length_penalty("x" * 20) == 0.0 and length_penalty("x" * 19) == -0.5
    assert length_penalty("x" * 800) == 0.0 and length_penalty("x" * 801) == -0.5
    assert length_penalty("  " + "好" * 20 + "\n") == 0.0  # stripped; a Chinese character counts one
    think = lambda n: f"<think>\n{'t' * n}\n</think>\n<answer>\n{'a' * 20}\n</answer>"
    assert length_penalty(think(20)) == 0.0 and length_penalty(think(300)) == 0.0
    assert length_penalty(think(19)) == -0.5 and length_penalty(think(301)) == -0.5
    assert length_penalty(think(5000)) == -1.0  # both windows missed
    assert length_penalty("x" * 100, max=50) == -0.5 and length_penalty("xx", min=1) == 0.0
    # 3-grams of "a b c a b c": abc bca cab abc -> 1 repeat in 4 -> -2 * 0.25
    assert repetition_penalty("a b c a b c") == -0.5
    assert repetition_penalty("A b C a B c") == -0.5  # case-insensitive
    assert repetition_penalty("a b c a b c", n=2) == -0.8  # ab bc ca ab bc: 2 of 5
    assert repetition_penalty("一二三四五六七八九") == 0.0 and repetition_penalty("我我我我我") == -1.0
    assert repetition_penalty("a b") == 0.0 and repetition_penalty("") == 0.0  # no 3-grams
    assert -1.0 <= repetition_penalty("the " * 100) <= 0.0


def test_spec_is_the_weighted_sum_of_its_terms():
    prompts = [ask("What is 3 + 4?", "7"), ask("What is 10 - 12?", "-2", "rl.jsonl:2")]
    replies = [  # two replies per prompt, as GRPO samples them
        "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>",
        "8 8 8 8 8 8",
        "<think>\n10 - 12 = -2, since 12 is larger\n</think>\n<answer>\n-2\n</answer>",
        "It is 2.",
    ]
    spec = "rule:math+0.2*rule:format - 0.5 * rule:length@max=40 + 1e-1*rule:repetition@n=2 - rule:math"
    fn = parse_reward(spec)
    out = fn(prompts, replies)
    answers = ["7", "7", "-2", "-2"]
    math = [math_reward(r, a) for r, a in zip(replies, answers)]
    assert math == [1.0, 0.0, 1.0, 0.0]
    expected = {
        "rule:math": math,
        "rule:format": [format_reward(r) for r in replies],
        "rule:length@max=40": [length_penalty(r, max=40) for r in replies],
        "rule:repetition@n=2": [repetition_penalty(r, n=2) for r in replies],
    }
    assert list(out.parts) == list(expected)  # rule:math twice is one term, weights added (1 - 1 = 0)
    for name, values in expected.items():
        assert out.parts[name].tolist() == pytest.approx(values)
    total = [0.0 * m + 0.2 * f - 0.5 * n + 0.1 * r for m, f, n, r in zip(*expected.values())]
    assert out.total.dtype == torch.float32 and out.total.tolist() == pytest.approx(total, abs=1e-6)
    assert len(set(out.total.tolist())) == 4  # the terms really differ between the replies
    one_each = parse_reward("rule:math")(prompts + prompts, [replies[0], replies[2], replies[1], replies[3]])
    assert one_each.total.tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="3 replies for 2 prompts"):
        fn(prompts, replies[:3])


def test_math_needs_a_numeric_reference_answer():
    fn = parse_reward("rule:math + rule:format")
    with pytest.raises(ConfigError, match="^rl.jsonl:7: rule:math needs a reference answer"):
        fn.check([ask("Hi", "1"), ask("Hi", None, "rl.jsonl:7")])
    with pytest.raises(ConfigError, match="rl.jsonl:7"):
        fn([ask("Hi", None, "rl.jsonl:7")], ["1"])
    with pytest.raises(DataError, match="^rl.jsonl:3: rule:math needs a numeric answer, got 'Paris'"):
        fn.check([ask("Capital of France?", "Paris", "rl.jsonl:3")])
    parse_reward("rule:format + rule:length").check([ask("Hi")])  # no rule needs an answer


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty spec"),
        ("rule:math +", "missing term"),
        ("rule:math + - rule:format", "missing term"),
        ("rule:maths", "unknown rule 'maths'.*math, close, format, length, repetition"),
        ("reward:math", "unknown reward 'reward:math'"),
        ("math", "unknown reward 'math'"),
        ("x*rule:math", "bad weight in 'x\\*rule:math'"),
        ("rule:math*2", "bad weight"),
        ("0.5 rule:math", "weight without '\\*'"),
        ("rule:math rule:format", "holds two terms"),
        ("rule:length@max=abc", "option max='abc'.*not a number"),
        ("rule:length@limit=3", "unknown option 'limit'.*min, max, think_min, think_max"),
        ("rule:math@clip=3", "unknown option 'clip'.*none"),
        ("rule:length@max", "bad options"),
        ("rm:", "rm: needs a path"),
        ("hf:", "hf: needs a path"),
        ("0.5*rm:/no/such/run", "rm:/no/such/run: no such directory"),
        ("rule:format - hf:/no/such/model-0.5b@clip=3", "hf:/no/such/model-0.5b: no such directory"),
        ("hf:/no/such/model@temperature=3", "unknown option 'temperature'.*clip"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_reward(spec)


# ---- reward models -------------------------------------------------------------------------------


def sums(a: int, b: int, wrong: bool = False) -> tuple[list[dict], str]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}], f"{a} + {b} = {a + b + wrong}."


@pytest.fixture(scope="module")
def rm_run(tokenizer, tmp_path_factory):
    """A tiny reward model taught (Bradley-Terry, 60 steps) to prefer right sums, saved as `minimind
    reward` saves it."""
    torch.manual_seed(0)
    model = RewardModel.from_backbone(MiniMind(tiny_config(vocab_size=tokenizer.vocab_size)))
    pairs = [(a, b) for a in (3, 14, 25) for b in (6, 17)]
    convs = [m + [{"role": "assistant", "content": r}] for a, b in pairs for m, r in (sums(a, b), sums(a, b, True))]
    seqs = [ids for ids, _, _ in encode_conversations(tokenizer, convs)]  # type: ignore[misc]
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s)
    lengths = torch.tensor([len(s) for s in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses from threads on a busy machine (20x)
    try:
        for _ in range(60):
            r, _ = model(ids, lengths=lengths)
            loss = bradley_terry_loss(r[::2], r[1::2]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("rm") / "rm"
    save_run(out, model.eval(), tokenizer, {"stage": "reward"})
    return out, pairs


def test_rm_scores_the_visible_reply_like_score(rm_run):
    run_dir, pairs = rm_run
    prompts = [ask(sums(a, b)[0][0]["content"]) for a, b in pairs]
    right = [sums(a, b)[1] for a, b in pairs]
    wrong = [sums(a, b, True)[1] for a, b in pairs]
    thought = [f"<think>\nadding the ones first\n</think>\n{r}" for r in right]
    replies = [x for triple in zip(right, wrong, thought) for x in triple]  # three replies per prompt
    rewards.load_rm.cache_clear()
    fn = parse_reward(f"rm:{run_dir} + 0.5*rm:{run_dir}@clip=0.05")
    out = fn(prompts, replies)
    out_again = fn(prompts, replies)
    assert rewards.load_rm.cache_info().misses == 1  # loaded once for both terms and both calls
    model, tok = load_reward_model(run_dir)
    direct = [
        score(model, tok, [p.messages + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)])
        for replies in (right, wrong)
    ]
    raw = out.parts[f"rm:{run_dir}"].view(-1, 3)
    # the same numbers as scoring directly; the think block is not shown to the reward model
    torch.testing.assert_close(raw[:, 0], torch.tensor(direct[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw[:, 1], torch.tensor(direct[1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw[:, 2], raw[:, 0])
    assert (raw[:, 0] > raw[:, 1]).all()  # it was taught that right sums are better
    clipped = out.parts[f"rm:{run_dir}@clip=0.05"]
    assert clipped.abs().max() <= 0.05 and (raw.abs() > 0.05).any()
    torch.testing.assert_close(clipped, out.parts[f"rm:{run_dir}"].clamp(-0.05, 0.05))
    torch.testing.assert_close(out.total, raw.flatten() + 0.5 * clipped)
    torch.testing.assert_close(out_again.total, out.total)


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory):
    """A tiny Llama sequence classifier with one label, and our tokenizer (chat template, pad token)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_id,
    )
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 2.0)  # scores of about ±10, so that a clip of 10 engages on some
    path = tmp_path_factory.mktemp("hf") / "rm"
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


CONVERSATIONS = [
    ("What is 3 + 4?", "<think>\nthree and four\n</think>\n<answer>7</answer>"),
    ("你好", "你好！有什么可以帮你的吗？"),
    ("What is 3 + 4?", "8"),
    ("Name a colour.", "The sky is blue, the leaf is green and the snow is white."),
]


def test_hf_reward_equals_a_direct_transformers_forward(hf_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = [ask(q) for q, _ in CONVERSATIONS]
    replies = [r for _, r in CONVERSATIONS]
    rewards.load_hf.cache_clear()
    out = parse_reward(f"hf:{hf_dir}@clip=1e6 + 0.1*hf:{hf_dir}")(prompts, replies)
    assert rewards.load_hf.cache_info().misses == 1
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    direct = []
    for q, r in CONVERSATIONS:
        visible = r.split("</think>")[-1].strip()  # the reasoning is not shown to the reward model
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": visible}]
        ids = tok.apply_chat_template(messages, tokenize=False)
        assert ids.startswith("<|im_start|>user\n") and ids.endswith(f"{visible}<|im_end|>\n")
        with torch.no_grad():
            direct.append(model(torch.tensor([tok(ids, add_special_tokens=False)["input_ids"]])).logits[0, 0].item())
    raw = out.parts[f"hf:{hf_dir}@clip=1e6"]
    torch.testing.assert_close(raw, torch.tensor(direct), rtol=1e-4, atol=1e-4)  # batched and padded
    assert (raw.abs() > 10).any() and (raw.abs() < 10).any()
    torch.testing.assert_close(out.parts[f"hf:{hf_dir}"], raw.clamp(-10, 10))  # the default clip
    torch.testing.assert_close(out.total, raw + 0.1 * raw.clamp(-10, 10))
    # Without a padding id every conversation runs alone; without a chat template, as plain lines.
    model.config.pad_token_id = None
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": r}] for q, r in CONVERSATIONS[1:]]
    torch.testing.assert_close(torch.tensor(rewards.hf_scores(model, tok, convs)), raw[1:], rtol=1e-4, atol=1e-4)
    tok.chat_template = None
    assert rewards.hf_text(tok, convs[0]) == ("user: 你好\nassistant: 你好！有什么可以帮你的吗？", True)
