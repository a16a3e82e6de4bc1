"""RL stages (GRPO, SPO, PPO) mechanics: rollout log-probs are the training log-probs of the sampled
the first EOS, the ratio is exactly 1 on a rollout's first step and moves (and clips) after it, exact
resume in the middle of a rollout, and DDP trains the wrapped model (ranks stay identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _run_cli, sharp_model
from safetensors.torch import load_file

from minimind.cli import build_parser
from minimind.data.batch import IGNORE
from minimind.errors import ConfigError
from minimind.generate import SamplingParams, generate
from minimind.losses import token_logps
from minimind.rl.rollout import completion_rows
from minimind.stages import grpo


def test_rollout_logprobs_are_the_training_logprobs_of_what_was_sampled():
    """Left-padded, KV-cached, batched sampling at T = 0.7 records log-probs that equal (1e-4) a plain
    forward of each prompt + completion alone, through softmax(logits / T); labels cover each completion
    up to and including its first stop token, nothing after it."""
    torch.manual_seed(0)
    model = sharp_model()
    prompts = [[5, 17, 3], [9, 2, 44, 81, 7, 30, 12], [100]]
    stops = tuple(range(0, 512, 9))  # ~1 token in 9 ends a completion: most stop early, some run out
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=1.0, top_k=0, stop_ids=stops, seed=3)
    gens = generate(model, [p for p in prompts for _ in range(4)], params).generations
    each = [p for p in prompts for _ in range(4)]
    assert {g.finish_reason for g in gens} == {"stop", "length"}
    for g in gens:
        body = g.tokens[:-1] if g.finish_reason == "stop" else g.tokens
        assert not set(body) & set(stops)
        assert (g.tokens[-1] in stops) == (g.finish_reason == "stop")
    inputs, labels = completion_rows(each, [g.tokens for g in gens], pad_id=0)
    with torch.no_grad():
        batched = token_logps(model(inputs).logits, labels, 0.7)
    for j, (p, g) in enumerate(zip(each, gens)):
        n = len(g.tokens)
        assert int((labels[j] != IGNORE).sum()) == n
        assert labels[j, len(p) - 1 : len(p) - 1 + n].tolist() == g.tokens
        alone = torch.tensor([p + g.tokens[:-1]])
        with torch.no_grad():
            logits = model(alone).logits[0, len(p) - 1 :]
        single = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(g.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(g.logprobs), single, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched[j, len(p) - 1 : len(p) - 1 + n], single, atol=1e-4, rtol=1e-4)


def rl_argv(pipeline, out, *extra) -> list[str]:
    f = pipeline["files"]
    argv = ["grpo", "--from", pipeline["sft"], "--data", f["rl"], "--reward", "rule:math", "--out", out]
    argv += ["--batch-size", 4, "--num-generations", 4, "--max-new-tokens", 10, "--seed", 0, "--log-every", 1]
    return [str(a) for a in [*argv, *extra]]


def prepare(pipeline, out, *extra):
    return grpo.prepare(build_parser("grpo").parse_args(rl_argv(pipeline, out, *extra)))


def take_metrics(trainer) -> dict[str, float]:
    sums, trainer.metric_sums = trainer.metric_sums, {}
    return {k: float(v) for k, v in sums.items()}


def test_ratio_is_one_on_the_first_step_then_moves_and_clips(pipeline, tmp_path):
    # A reward that differs within groups (reply length), so that advantages are not all 0.
    varied = ["--reward", "rule:length@min=13,think_min=0", "--temperature", 1.5]
    trainer, _ = prepare(pipeline, tmp_path / "r", "--ppo-epochs", 3, "--lr", 3e-2, "--max-steps", 3, *varied)
    _, _, counts = trainer.train_step()  # [loss units, tokens] of the step
    units = float(counts[0])
    first = take_metrics(trainer)
    assert units == 16  # grpo averages per completion: 4 prompts x 4 completions
    assert first["ratio"] == units and first["approx_kl"] == 0 and first["clip_frac"] == 0
    trainer.train_step()
    take_metrics(trainer)
    trainer.train_step()  # the same rollout, a policy that has moved twice (lr 3e-2)
    third = take_metrics(trainer)
    assert abs(third["ratio"] / units - 1) > 1e-3 and third["approx_kl"] > 0
    assert third["clip_frac"] > 0


def test_grpo_resume_in_the_middle_of_a_rollout_is_bitwise_exact(pipeline, tmp_path):
    """6 steps straight == 3 steps (a rollout half used: 2 epochs each), killed, `--resume` (CLI,
    without the RL flags: restored from run.json): identical weights."""
    extra = ["--ppo-epochs", 2, "--max-steps", 6, "--warmup-steps", 2, "--beta", 0.05, "--num-generations", 3]
    _run_cli(*rl_argv(pipeline, tmp_path / "straight", *extra))
    trainer, _ = prepare(pipeline, tmp_path / "split", *extra)
    while trainer.step < 3:
        trainer.train_step()
    assert trainer.source.steps_left == 1
    trainer.save()  # the process dies here
    common = ["--data", pipeline["files"]["rl"], "--seed", 0, "--log-every", 1]
    log = _run_cli("grpo", "--out", tmp_path / "split", "--resume", *map(str, common))
    assert "resuming at step 3" in log
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "split" / "run.json").read_text())
    assert info["stage"] == "grpo" and info["rl"]["num_generations"] == 3 and info["rl"]["reward"] == "rule:math"


def test_bad_options_are_refused(pipeline, tmp_path):
    with pytest.raises(ConfigError, match="--reward SPEC is required"):
        argv = ["grpo", "--from", pipeline["sft"], "--data", pipeline["files"]["rl"], "--out", tmp_path / "a"]
        args = build_parser("grpo").parse_args([str(a) for a in argv])
        grpo.prepare(args)
    with pytest.raises(ConfigError, match="at least 2 for GRPO"):
        prepare(pipeline, tmp_path / "b", "--num-generations", 1)
    with pytest.raises(ConfigError, match="--temperature must be > 0"):
        prepare(pipeline, tmp_path / "c", "--temperature", 0)
    with pytest.raises(ConfigError, match="--loss"):
        prepare(pipeline, tmp_path / "d", "--loss", "ppo")
    no_answer = tmp_path / "p.jsonl"
    no_answer.write_text(json.dumps({"conversations": [{"role": "user", "content": "What is 1 + 1?"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"p.jsonl:1"):
        prepare(pipeline, tmp_path / "e", "--data", no_answer)


WORKER = Path(__file__).with_name("rl_ddp_worker.py")


def test_ddp_trains_the_wrapped_model(pipeline, tmp_path):
    """Two gloo processes sample different prompts; gradients are averaged through the DDP-wrapped
    model, so both ranks end with the same weights, which moved from the start."""
    # rule:close (a reply that ends scores 1) differs within a group from the first step; rule:math on
    # 10-token replies of the tiny model may score 0 everywhere, and then nothing moves by design.
    argv = rl_argv(pipeline, tmp_path / "ddp", "--max-steps", 3, "--lr", 1e-3, "--batch-size", 2, "--device", "cpu",
                   "--reward", "rule:close")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run(
        cmd + [str(tmp_path)] + argv, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["prompts"] != r1["prompts"]  # each rank rolled out its own prompts
    start = load_file(str(pipeline["sft"] / "model.safetensors"))
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert any(not torch.equal(r0["weights"][k], start[k]) for k in start)


def test_spo_resume_keeps_baselines_drift_and_prioritised_draws(pipeline, tmp_path):
    """SPO (one sample per prompt, tracked baselines, prioritised sampling): 4 steps straight == 2 steps,
    killed, `--resume` (without --prioritize: restored from the state): identical weights and tracker."""
    from minimind.stages import spo

    def argv(out, *extra):
        f = pipeline["files"]
        base = ["spo", "--from", pipeline["sft"], "--data", f["rl"], "--out", out, "--batch-size", 8, "--seed", 0]
        base += [
            "--reward",
            "rule:math+rule:close+rule:length@min=13,think_min=0",
            "--max-new-tokens",
            10,
            "--max-steps",
            4,
        ]
        return [str(a) for a in [*base, *extra]]

    _run_cli(*argv(tmp_path / "straight", "--prioritize"))
    trainer, _ = spo.prepare(build_parser("spo").parse_args(argv(tmp_path / "split", "--prioritize")))
    state = trainer.source.hooks
    while trainer.step < 2:
        trainer.train_step()
    assert state.rollouts == 2 and state.drift > 0 and len(state.tracker) > 0
    trainer.save()  # the process dies here
    _run_cli("spo", "--out", tmp_path / "split", "--resume", "--data", pipeline["files"]["rl"], "--seed", 0)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "straight" / "train_state.pt")["sources"][0]["stage"]
    sb = torch.load(tmp_path / "split" / "train_state.pt")["sources"][0]["stage"]
    assert sa["prioritize"] and sb["prioritize"] and sa["rollouts"] == sb["rollouts"] == 4
    assert torch.equal(sa["tracker"]["alpha"], sb["tracker"]["alpha"]) and sa["drift"] == sb["drift"]


def ppo_argv(pipeline, out, *extra) -> list[str]:
    f = pipeline["files"]
    argv = ["ppo", "--from", pipeline["sft"], "--data", f["rl"], "--out", out, "--batch-size", 4, "--seed", 0]
    argv += ["--reward", "rule:math+rule:length@min=13,think_min=0", "--max-new-tokens", 10, "--log-every", 1]
    return [str(a) for a in [*argv, *extra]]


def ppo_prepare(pipeline, out, *extra):
    from minimind.stages import ppo

    return ppo.prepare(build_parser("ppo").parse_args(ppo_argv(pipeline, out, *extra)))


def test_ppo_puts_the_score_at_each_completions_last_token(pipeline, tmp_path):
    """With no KL penalty, gamma = lambda = 1, every token's GAE return is the completion's score: the
    score sits at the last real token of each row whatever the prompt and completion lengths."""
    trainer, _ = ppo_prepare(pipeline, tmp_path / "p", "--kl", 0, "--gamma", 1, "--lam", 1, "--accumulation", 2)
    source = trainer.source
    batches = source.rollout()
    texts_scores = []
    for b in batches:
        mask = b.labels != IGNORE
        assert mask.any(-1).all() and b.returns is not None and b.old_values is not None
        for j in range(b.input_ids.shape[0]):
            r = b.returns[j][mask[j]]
            assert torch.allclose(r, r[-1].expand_as(r), atol=1e-5)  # the same return at every token
            texts_scores.append(float(r[-1]))
    flat = torch.cat([b.advantages[b.labels != IGNORE] for b in batches])
    assert abs(float(flat.mean())) < 1e-5 and abs(float(flat.std()) - 1) < 1e-3  # whitened over the rollout
    # Each return is a possible total of rule:math (0 or 1) + rule:length without thinking (0 or -0.5).
    assert len(texts_scores) == 8 and set(np.round(texts_scores, 4)) <= {0.0, -0.5, 1.0, 0.5}


def test_ppo_resume_keeps_actor_critic_and_minibatch_position(pipeline, tmp_path):
    """6 steps (2 minibatches x 2 epochs per rollout) straight == 3 steps, killed, --resume: the actor and
    the critic (RUN/critic) identical; --target-kl cuts rollouts short the same way in both."""
    extra = ["--accumulation", 2, "--minibatches", 2, "--ppo-epochs", 2, "--max-steps", 6, "--target-kl", 1e-4]
    _run_cli(*ppo_argv(pipeline, tmp_path / "straight", *extra))
    trainer, _ = ppo_prepare(pipeline, tmp_path / "split", *extra)
    while trainer.step < 3:
        trainer.train_step()
    trainer.save()  # the process dies here
    _run_cli("ppo", "--out", tmp_path / "split", "--resume", "--data", pipeline["files"]["rl"], "--seed", 0)
    for sub in ("", "critic"):
        a = load_file(str(tmp_path / "straight" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "split" / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert "reward_head.weight" in load_file(str(tmp_path / "split" / "critic" / "model.safetensors"))
    sa = torch.load(tmp_path / "straight" / "train_state.pt")["sources"][0]
    sb = torch.load(tmp_path / "split" / "train_state.pt")["sources"][0]
    assert sa["stage"]["stopped"] == sb["stage"]["stopped"] > 0 and sa["sampler"] == sb["sampler"]


def even_answer(reply: str) -> float:
    """1 when the reply's final answer is an even integer, else 0 (a reward for the test alone)."""
    from minimind.rl.rewards import final_answer

    try:
        return float(int(float(final_answer(reply))) % 2 == 0)
    except (TypeError, ValueError):
        return 0.0


@pytest.mark.parametrize("stage", ["grpo", "ppo", "spo"])
def test_each_rl_stage_raises_the_mean_reward(pipeline, tmp_path, stage, monkeypatch):
    """20 steps of each algorithm on 32 prompts raise the mean reward of the policy's replies to them,
    greedy and sampled at the training temperature. The reward is one the 0.9M SFT model can learn in
    20 steps with a large margin on any CPU: an even final answer (about half of its samples to start
    with; a preference at the answer's tokens). The arithmetic reward `rule:close` moved greedy replies
    by -0.08..+0.20 over pipelines built on other instruction sets and seeds: no margin (NOTES.md)."""
    from minimind.data.prompts import read_prompts
    from minimind.rl import rewards
    from minimind.rl.rollout import RLOptions, held_out_rewards, policy_of
    from minimind.stages import ppo, spo

    monkeypatch.setitem(rewards.RULES, "even", ({}, lambda options: rewards.per_reply(even_answer)))
    data = tmp_path / "rl32.jsonl"
    data.write_text("".join(pipeline["files"]["rl"].read_text().splitlines(keepends=True)[:32]))
    argv = [stage, "--from", pipeline["sft"], "--data", data, "--out", tmp_path / stage, "--reward", "rule:even"]
    argv += ["--max-new-tokens", 16, "--max-steps", 20, "--seed", 0, "--log-every", 5, "--lr", 1e-4]
    argv += ["--temperature", 0.7] + (
        ["--batch-size", 8, "--num-generations", 8] if stage == "grpo" else ["--batch-size", 32]
    )
    args = build_parser(stage).parse_args([str(a) for a in argv])
    prepare = {"grpo": prepare_grpo, "ppo": ppo.prepare, "spo": spo.prepare}[stage]
    trainer, _ = prepare(args)
    practised = read_prompts([data])
    opts, reward = RLOptions(max_new_tokens=16, temperature=0.7), rewards.parse_reward("rule:even")
    measure = lambda: held_out_rewards(policy_of(trainer.model), trainer.tokenizer, practised, reward, opts, 8)
    before = measure()
    trainer.fit()
    after = measure()
    greedy = after["greedy"]["reward"] - before["greedy"]["reward"]
    sampled = after["sampled"]["reward"] - before["sampled"]["reward"]
    # Measured over 2 pipelines x 3 test seeds x 3 instruction-set settings (NOTES.md, session 9):
    # greedy +0.31..+0.50, sampled +0.13..+0.29; asserted at about half the smallest of each.
    assert greedy > 0.15 and sampled > 0.06, (stage, before, after)


def prepare_grpo(args):
    return grpo.prepare(args)


def test_spo_under_ddp_keeps_one_tracker_for_all_processes(pipeline, tmp_path):
    """SPO on two gloo processes with prioritised sampling: each process answers its own prompts, the
    rewards of the whole global draw update one tracker that every process holds identically (so both
    draw from the same weights), and the drift is the same number on both."""
    f = pipeline["files"]
    argv = ["spo", "--from", pipeline["sft"], "--data", f["rl"], "--out", tmp_path / "spo", "--reward", "rule:close"]
    argv += ["--batch-size", 4, "--max-new-tokens", 8, "--max-steps", 3, "--seed", 0, "--prioritize", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run(
        cmd + [str(tmp_path)] + [str(a) for a in argv], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(not set(a) & set(b) for a, b in zip(r0["prompts"], r1["prompts"]))  # disjoint halves of one draw
    s0, s1 = r0["stage"], r1["stage"]
    assert s0["drift"] == s1["drift"] > 0 and s0["rollouts"] == s1["rollouts"] == 3
    t0, t1 = s0["tracker"], s1["tracker"]
    assert torch.equal(t0["ids"], t1["ids"]) and torch.equal(t0["alpha"], t1["alpha"])
    assert torch.equal(t0["beta"], t1["beta"])
    seen = {i for a, b in zip(r0["prompts"], r1["prompts"]) for i in a + b}
    assert set(t0["ids"].tolist()) == seen  # the tracker saw every process's prompts


SHARDED = {"fsdp": ["--fsdp"], "zero2": ["--zero", "2"], "zero3": ["--zero", "3"]}


@pytest.mark.parametrize("stage, engines", [("grpo", ["fsdp", "zero2", "zero3"]), ("ppo", ["fsdp"]), ("spo", ["fsdp"])])
def test_rl_under_every_engine_equals_one_process(pipeline, tmp_path, stage, engines):
    """RL with one global batch of 4 prompts: 1 process x 4 == 2 gloo processes x 2 under DDP, FSDP2 /
    ZeRO-3 (each process samples from a whole replica gathered once per rollout and trains the sharded
    policy; PPO's critic sharded beside it) and ZeRO-2 (whole weights, sharded optimizer state). Each
    completion has its own keyed random stream, so all draw the same rollouts (same rewards and
    lengths), and they end with the same policy."""
    outs = {}
    for engine in ("one", "ddp", *engines):
        out = tmp_path / engine
        nproc, batch = (1, 4) if engine == "one" else (2, 2)
        argv = rl_argv(pipeline, out, "--max-steps", 3, "--lr", 1e-3, "--batch-size", batch, "--device", "cpu")
        argv += ["--reward", "rule:close"]  # a reward that differs between samples (a gradient to compare)
        argv[0] = stage
        if stage != "grpo":  # one completion per prompt
            k = argv.index("--num-generations")
            del argv[k : k + 2]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = (cmd if nproc > 1 else [sys.executable]) + ["-m", "minimind"]
        proc = subprocess.run(
            cmd + argv + SHARDED.get(engine, []), capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        outs[engine] = out
    metrics = {e: [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for e, o in outs.items()}
    start = load_file(str(pipeline["sft"] / "model.safetensors"))
    a = load_file(str(outs["one"] / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in start)
    for engine in ("ddp", *engines):
        assert len(metrics["one"]) == len(metrics[engine]) == 3
        for x, y in zip(metrics["one"], metrics[engine]):
            assert x["length"] == y["length"], engine  # the same rollouts
            assert abs(x["reward"] - y["reward"]) < 1e-9 and abs(x["loss"] - y["loss"]) < 1e-4, engine
        b = load_file(str(outs[engine] / "model.safetensors"))
        for k in a:
            # Adam turns a last-bit difference of a near-zero gradient (another reduction order) into a
            # visible one: ZeRO-3 left 1 weight in 16,384 2.4e-5 away from DDP after 3 steps at lr 1e-3.
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=f"{engine} {k}")


def test_grpo_under_zero3_resumes_exactly(pipeline, tmp_path):
    """GRPO under ZeRO-3 (sharded policy, whole replica for sampling): 2 steps, stopped, resumed to 4
    equals 4 steps straight, bit for bit (the replica is refreshed from the restored weights)."""
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minimind"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--lr", 1e-3, "--batch-size", 2, "--device", "cpu", "--warmup-steps", 0, "--min-lr-ratio", 1]
    common += ["--zero", 3]
    for out, steps in (("straight", 4), ("cut", 2)):
        argv = rl_argv(pipeline, tmp_path / out, "--max-steps", steps, "--save-every", 2, *common)
        proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    resume = ["grpo", "--resume", "--data", pipeline["files"]["rl"], "--out", tmp_path / "cut", "--max-steps", 4]
    proc = subprocess.run(cmd + [str(a) for a in resume + ["--device", "cpu", "--zero", 3]], capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
