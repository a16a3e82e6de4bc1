"""Reward model: scores read the last real token whatever the padding, training ranks held-out pairs
well above chance (from about chance), the run directory loads strictly for RL, and resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _run_cli, sharp_model
from safetensors.torch import load_file

from minimind.checkpoint import load_run
from minimind.cli import build_parser
from minimind.data.preference import iter_pairs
from minimind.errors import CheckpointError, ConfigError
from minimind.model import MiniMind
from minimind.reward_model import RewardModel, load_reward_model, score
from minimind.stages import reward


def accuracy(model, tok, pairs) -> float:
    scores = score(model, tok, [side for pair in pairs for side in pair])
    return sum(c > r for c, r in zip(scores[::2], scores[1::2])) / len(pairs)


def test_scores_read_the_last_token_whatever_the_batch(tokenizer):
    torch.manual_seed(0)
    model = RewardModel.from_backbone(sharp_model(vocab_size=tokenizer.vocab_size)).eval()
    convs = [
        [{"role": "user", "content": "Where does Mia live?"}, {"role": "assistant", "content": "Oakvale."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
        + [{"role": "assistant", "content": "2 + 3 = 5, because two and three make five."}],
    ]
    batched = score(model, tokenizer, convs)
    alone = [score(model, tokenizer, [c])[0] for c in convs]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=1e-5, atol=1e-5)
    # The score is the head applied to the final hidden state of the reply's closing <|im_end|>.
    ids = tokenizer.encode_chat(convs[0])[:-1]  # the template adds a newline after the last turn
    assert ids[-1] == tokenizer.eos_id
    with torch.no_grad():
        out = MiniMind.forward(model, torch.tensor([ids]), return_hidden=True)
        expected = model.reward_head(out.hidden[0, -1]).item()
    assert batched[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="must end with the assistant reply"):
        score(model, tokenizer, [convs[0][:1]])


def reward_argv(pipeline, out, *extra, data=None) -> list[str]:
    data = data or pipeline["files"]["dpo"]
    argv = ["reward", "--from", pipeline["sft"], "--data", data, "--out", out, "--max-seq-len", 64]
    return [str(a) for a in argv + ["--log-every", 20, "--seed", 0, *extra]]


def test_reward_model_learns_to_rank_heldout_pairs(pipeline, tmp_path):
    """CLI end to end: held-out pairwise accuracy near chance before, well above it after; the run
    directory is loadable for RL (strictly, backbone names unchanged) and nothing else mistakes it."""
    held = list(iter_pairs([pipeline["files"]["dpo_heldout"]]))
    sft = load_run(pipeline["sft"])
    torch.manual_seed(0)
    before = accuracy(RewardModel.from_backbone(sft.model).eval(), sft.tokenizer, held)
    out = tmp_path / "rm"
    log = _run_cli(*reward_argv(pipeline, out, "--eval-data", pipeline["files"]["dpo_heldout"], "--max-steps", 120))
    assert "held-out before: pairwise accuracy" in log and "held-out after: pairwise accuracy" in log
    model, tok = load_reward_model(out)
    after = accuracy(model, tok, held)
    # Measured 0.52 -> 0.70 and 0.56 -> 0.80 on pipelines built with AVX-512 and AVX2 kernels (NOTES.md,
    # session 9): asserted at half the smaller gain, and clearly above chance.
    assert abs(before - 0.5) <= 0.2 and after >= 0.6 and after >= before + 0.09, (before, after)
    assert f"held-out after: pairwise accuracy {after:.0%}" in log  # score() agrees with training's scores
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() - load_file(str(pipeline["sft"] / "model.safetensors")).keys() == {"reward_head.weight"}
    with pytest.raises(CheckpointError, match="unexpected tensors \\['reward_head.weight'\\]"):
        load_run(out)  # strict: never silently a language model without its head
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(pipeline["sft"])


def test_reward_resume_is_bitwise_exact(pipeline, tmp_path):
    """6 steps straight (CLI, 10% held out) == 3 steps, killed, `--resume` (CLI), 3 more."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(pipeline["files"]["dpo"].read_text().splitlines(keepends=True)[:120]))
    extra = ["--max-steps", 6, "--warmup-steps", 2, "--log-every", 2, "--heldout", 0.2]
    _run_cli(*reward_argv(pipeline, tmp_path / "straight", *extra, data=data))
    args = build_parser("reward").parse_args(reward_argv(pipeline, tmp_path / "split", *extra, data=data))
    interrupted, held = reward.prepare(args)
    assert held is not None and len(held) == 24 and len(interrupted.rows) == 96
    while interrupted.step < 3:
        interrupted.train_step()
    interrupted.save()  # the process dies here
    log = _run_cli("reward", "--out", tmp_path / "split", "--resume", "--data", data, "--max-seq-len", 64)
    assert "resuming at step 3" in log and "24 of the pairs" in log  # the same split, from run.json
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "split" / "run.json").read_text())["stage"] == "reward"


def test_heldout_flags_are_checked(pipeline, tmp_path):
    args = build_parser("reward").parse_args(
        reward_argv(pipeline, tmp_path / "x", "--heldout", 0.1, "--eval-data", pipeline["files"]["dpo_heldout"])
    )
    with pytest.raises(ConfigError, match="not both"):
        reward.prepare(args)
