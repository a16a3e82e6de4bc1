"""The training engine: learning, exact resume, accumulation and DDP invariance, the NaN guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind.config import ModelConfig, TrainConfig
from minimind.data.demo import write_demo_data
from minimind.data.packing import PackedRows
from minimind.data.tokens import tokenize_files
from minimind.engine import Trainer, TrainingError, evaluate_loss, lm_loss
from minimind.model import MiniMind

SEQ = 32


@pytest.fixture(scope="module")
def demo_rows(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    files = write_demo_data(root / "data", scale=0.4)
    train = tokenize_files([files["pretrain"]], tokenizer, root / "cache")
    held = tokenize_files([files["pretrain_heldout"]], tokenizer, root / "cache")
    return (PackedRows(train.tokens, train.offsets, SEQ), PackedRows(held.tokens, held.offsets, SEQ), files, root)


def make_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return MiniMind(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=256,
        )
    )


def train(tokenizer, rows, out, **kw):
    cfg = TrainConfig(
        out=str(out),
        max_seq_len=SEQ,
        **{"batch_size": 8, "accumulation": 1, "lr": 3e-3, "log_every": 5, "warmup_steps": 2, **kw},
    )
    trainer = Trainer(cfg, make_model(tokenizer), tokenizer, rows, {"stage": "test"})
    return trainer, trainer.fit()


def test_pretraining_learns_held_out_text(tokenizer, demo_rows, tmp_path):
    rows, held, _, _ = demo_rows
    trainer, result = train(tokenizer, rows, tmp_path / "run", max_steps=80)
    before = evaluate_loss(make_model(tokenizer), held)
    after = evaluate_loss(trainer.model, held)
    assert after < 0.5 * before, (before, after)
    assert result.steps == 80
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 16 and all(k in lines[0] for k in ('"step"', '"loss"', '"lr"', '"tokens_per_s"'))


def test_resume_is_bitwise_exact(tokenizer, demo_rows, tmp_path):
    """12 steps straight == 6 steps, killed, --resume, 6 more: identical bits."""
    rows = demo_rows[0]
    train(tokenizer, rows, tmp_path / "straight", max_steps=12)
    cfg = TrainConfig(
        out=str(tmp_path / "split"),
        max_seq_len=SEQ,
        batch_size=8,
        accumulation=1,
        lr=3e-3,
        log_every=5,
        warmup_steps=2,
        max_steps=12,
    )
    interrupted = Trainer(cfg, make_model(tokenizer), tokenizer, rows, {"stage": "test"})
    while interrupted.step < 6:
        interrupted.train_step()
    interrupted.save()  # the process dies here
    resumed, result = train(tokenizer, rows, tmp_path / "split", max_steps=12, resume=True)
    assert result.steps == 12 and result.tokens == 6 * 8 * SEQ  # only the missing half was trained
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gradient_accumulation_is_invariant(tokenizer, demo_rows, tmp_path):
    rows = demo_rows[0]
    big, _ = train(tokenizer, rows, tmp_path / "b8", batch_size=8, accumulation=1, max_steps=4)
    acc, _ = train(tokenizer, rows, tmp_path / "b4x2", batch_size=4, accumulation=2, max_steps=4)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def test_nan_loss_stops_and_keeps_last_checkpoint(tokenizer, demo_rows, tmp_path):
    rows = demo_rows[0]
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, aux = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] > 6 else loss), aux

    cfg = TrainConfig(
        out=str(tmp_path / "nan"),
        max_seq_len=SEQ,
        batch_size=8,
        accumulation=1,
        max_steps=20,
        save_every=4,
        log_every=1,
    )
    trainer = Trainer(cfg, make_model(tokenizer), tokenizer, rows, {"stage": "test"}, loss_fn=poisoned)
    with pytest.raises(TrainingError, match="loss is nan at step 7"):
        trainer.fit()
    saved = torch.load(tmp_path / "nan" / "train_state.pt", weights_only=True)
    assert saved["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan" / "model.safetensors").values())


def test_resume_refuses_mismatched_checkpoint(tokenizer, demo_rows, tmp_path):
    from minimind.checkpoint import save_weights
    from minimind.errors import CheckpointError

    rows = demo_rows[0]
    train(tokenizer, rows, tmp_path / "r", max_steps=4)
    folder = tmp_path / "r" / "checkpoints" / "step-00000004"
    save_weights(make_model(tokenizer), folder / "model.safetensors", {"step": "3"})  # tampered with
    with pytest.raises(CheckpointError, match="from step 3 but train_state.pt from step 4"):
        train(tokenizer, rows, tmp_path / "r", max_steps=8, resume=True)


class Killed(BaseException):
    """What a kill does to a save: it stops at that point (BaseException: no handler catches it)."""


def test_a_kill_at_any_write_point_leaves_an_exactly_resumable_run(tokenizer, demo_rows, tmp_path, monkeypatch):
    """Fault injection: kill a run at each of the points where a save changes the disk (every rename,
    hard link and removal, in all three saves), then `--resume` (or start afresh when no checkpoint was
    complete yet). The run always ends bit-identical to an uninterrupted one, and the run directory's
    model.safetensors is a complete file at every point."""
    from minimind import checkpoint as ckpt
    from minimind import fileio

    rows, kw = demo_rows[0], dict(max_steps=6, save_every=2, log_every=2)
    train(tokenizer, rows, tmp_path / "straight", **kw)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    points: list[str] = []
    monkeypatch.setattr(fileio, "write_point", points.append)
    train(tokenizer, rows, tmp_path / "count", **kw)
    assert sum(p.startswith("rename") and p.endswith("latest") for p in points) == 3 and len(points) > 30
    for k in range(len(points)):
        out, seen = tmp_path / f"kill{k}", []

        def kill_at_k(what: str, seen=seen, k=k) -> None:
            seen.append(what)
            if len(seen) == k + 1:
                raise Killed(what)

        monkeypatch.setattr(fileio, "write_point", kill_at_k)
        with pytest.raises(Killed):
            train(tokenizer, rows, out, **kw)
        monkeypatch.setattr(fileio, "write_point", lambda what: None)
        if (out / "model.safetensors").exists():
            load_file(out / "model.safetensors")  # never a partial file
        complete = ckpt.latest_checkpoint(out) is not None
        _, result = train(tokenizer, rows, out, resume=complete, **kw)
        assert result.steps == 6
        final = load_file(out / "model.safetensors")
        assert all(torch.equal(final[n], straight[n]) for n in straight), (k, points[k])
        assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-00000006"], points[k]


class NaNGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_nonfinite_gradient_is_never_applied_and_stops_training(tokenizer, demo_rows, tmp_path):
    """A finite loss with a NaN gradient at step 5: the update is not applied (weights and AdamW's
    moments stay as they were), training stops before saving step 5, the last checkpoint (step 4)
    holds exactly the weights the model still has."""
    rows, calls = demo_rows[0], {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, aux = lm_loss(model, batch)
        return (NaNGradient.apply(loss) if calls["n"] == 5 else loss), aux

    cfg = TrainConfig(out=str(tmp_path / "g"), max_seq_len=SEQ, batch_size=8, accumulation=1, max_steps=20,
                      save_every=1, log_every=10)  # fmt: skip
    trainer = Trainer(cfg, make_model(tokenizer), tokenizer, rows, {"stage": "test"}, loss_fn=poisoned)
    with pytest.raises(TrainingError, match="not finite in 1 step.* at step 5.*step 4"):
        trainer.fit()
    saved = load_file(tmp_path / "g" / "model.safetensors")
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), saved[name]) if name in saved else True, name
    state = torch.load(tmp_path / "g" / "train_state.pt", weights_only=True)
    assert state["step"] == 4
    moments = [s["exp_avg"] for s in trainer.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, state["optimizer"]["state"].values()))


def test_a_huge_learning_rate_never_saves_nonfinite_weights(tokenizer, demo_rows, tmp_path):
    """The review's reproduction (--lr 1e4 --save-every 1 --warmup-steps 0): training stops, and every
    checkpoint it wrote holds finite weights."""
    with pytest.raises(TrainingError, match="Last good checkpoint"):
        train(tokenizer, demo_rows[0], tmp_path / "lr", lr=1e4, warmup_steps=0, save_every=1, max_steps=30)
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "lr" / "model.safetensors").values())


def run_cli(args, env=None, nproc=1):
    prefix = (
        [sys.executable, "-m", "minimind"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "minimind",
        ]
    )
    proc = subprocess.run(
        prefix + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_ddp_two_processes_match_one(tokenizer_dir, demo_rows, tmp_path):
    """2 gloo processes x batch 4 == 1 process x batch 8, step for step."""
    files, root = demo_rows[2], demo_rows[3]
    common = [
        "pretrain",
        "--data",
        files["pretrain"],
        "--tokenizer",
        tokenizer_dir,
        "--preset",
        "tiny",
        "--hidden-size",
        64,
        "--num-layers",
        2,
        "--max-seq-len",
        SEQ,
        "--accumulation",
        1,
        "--max-steps",
        5,
        "--lr",
        3e-3,
        "--log-every",
        1,
        "--cache-dir",
        root / "cache",
        "--device",
        "cpu",
    ]
    run_cli(common + ["--out", tmp_path / "one", "--batch-size", 8])
    run_cli(common + ["--out", tmp_path / "two", "--batch-size", 4], nproc=2)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def pretrain_argv(demo_rows, tokenizer_dir, out, *extra):
    """A tiny pretraining run at a constant learning rate (the schedule does not depend on --max-steps,
    so a run stopped at step 2 and resumed to 4 can be compared with 4 steps straight)."""
    files, root = demo_rows[2], demo_rows[3]
    argv = ["pretrain", "--data", files["pretrain"], "--tokenizer", tokenizer_dir, "--preset", "tiny"]
    argv += ["--hidden-size", 64, "--num-layers", 2, "--max-seq-len", SEQ, "--accumulation", 1, "--lr", 3e-3]
    argv += ["--warmup-steps", 0, "--min-lr-ratio", 1, "--log-every", 1, "--cache-dir", root / "cache"]
    return argv + ["--device", "cpu", "--out", out, *extra]


def test_resume_under_another_number_of_processes_keeps_the_global_batch(tokenizer_dir, demo_rows, tmp_path):
    """2 processes x batch 4 for 2 steps, resumed by 1 process (accumulation 2), and 1 process x batch 8
    resumed by 2 processes (batch 4): both equal 4 steps of 1 process x batch 8 (same global batches,
    same data order). And one process under torchrun (DDP and its collectives at world size 1) equals
    the plain run bit for bit."""
    argv = lambda out, *extra: pretrain_argv(demo_rows, tokenizer_dir, tmp_path / out, *extra)
    run_cli(argv("one", "--batch-size", 8, "--max-steps", 4))
    run_cli(argv("launched", "--batch-size", 8, "--max-steps", 4), nproc=1)
    run_cli(argv("two", "--batch-size", 4, "--max-steps", 2), nproc=2)
    resume = ["pretrain", "--resume", "--data", demo_rows[2]["pretrain"], "--max-steps", 4, "--device", "cpu"]
    log = run_cli(resume + ["--out", tmp_path / "two"])
    assert "--batch-size 4 --accumulation 2 keep the global batch of 8" in log, log
    run_cli(argv("back", "--batch-size", 8, "--max-steps", 2))
    log = run_cli(resume + ["--out", tmp_path / "back"], nproc=2)
    assert "--batch-size 4 --accumulation 1 keep the global batch of 8" in log, log
    one = load_file(tmp_path / "one" / "model.safetensors")
    launched = load_file(tmp_path / "launched" / "model.safetensors")
    assert all(torch.equal(one[k], launched[k]) for k in one)
    for name in ("two", "back"):
        other = load_file(tmp_path / name / "model.safetensors")
        for k in one:
            torch.testing.assert_close(one[k], other[k], atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
    with pytest.raises(AssertionError, match="cannot split evenly"):
        run_cli(argv("odd", "--batch-size", 3, "--max-steps", 1), nproc=2)
        run_cli(resume + ["--out", tmp_path / "odd"], nproc=4)


DDP_WORKER = Path(__file__).with_name("engine_ddp_worker.py")


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_a_nan_on_one_process_stops_every_process_together(tokenizer_dir, demo_rows, tmp_path, engine):
    """Only the last of two gloo processes gets a NaN loss (step 3): the gradient reduction (DDP's
    all-reduce, FSDP2's and ZeRO's reduce-scatter) spreads it to both, neither applies the update
    (DeepSpeed skips the step itself), and both stop at the same step, with the last good checkpoint
    (step 2, finite) named; no process is left waiting in a collective."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    files, root = demo_rows[2], demo_rows[3]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DDP_WORKER)]
    cmd += [str(tmp_path), str(tokenizer_dir), str(files["pretrain"]), str(root / "cache"), engine]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    expected = "stopped at step 4: gradient norm was not finite in 1 step(s) at step 4"
    assert all(text.startswith(expected) and "(step 2)" in text for text in seen), seen
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "model.safetensors").values())
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 2


def test_yaml_config_and_flags(tokenizer_dir, demo_rows, tmp_path):
    files, root = demo_rows[2], demo_rows[3]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"preset: tiny\nmax-steps: 3\nbatch_size: 2\nmax_seq_len: {SEQ}\nhidden_size: 64\n"
        f"num_layers: 2\naccumulation: 1\nlog_every: 1\nlr: 1e-3\n"
    )
    out = run_cli(
        [
            "pretrain",
            "--config",
            yaml_file,
            "--data",
            files["pretrain"],
            "--tokenizer",
            tokenizer_dir,
            "--out",
            tmp_path / "y",
            "--max-steps",
            2,
            "--cache-dir",
            root / "cache",
        ]
    )
    assert "step 2/2" in out and "of 2x1x1 rows x 32 tokens" in out  # the flag beat the YAML's max-steps
    import json

    info = json.loads((tmp_path / "y" / "run.json").read_text())
    assert info["train_config"]["lr"] == 0.001 and info["train_config"]["max_steps"] == 2


def test_bool_flags_work_bare_and_with_values():
    """`--compile --resume` as the issue spells them, and `--doc-mask false` to beat a YAML value."""
    import argparse

    from minimind.config import TrainConfig
    from minimind.options import add_options, given

    p = argparse.ArgumentParser()
    add_options(p, TrainConfig, "training")
    args = p.parse_args(["--compile", "--resume", "--doc-mask", "false", "--batch-size", "4"])
    assert given(args, TrainConfig) == {
        "compile": True,
        "resume": True,
        "doc_mask": False,
        "batch_size": 4,
    }


def test_resume_keeps_the_options_the_run_started_with(tmp_path):
    """`--resume` alone continues with the saved schedule; an explicit flag still wins."""
    import argparse
    import json

    from minimind.stages.common import add_stage_arguments, stage_options

    (tmp_path / "run.json").write_text(json.dumps({"train_config": {"lr": 0.123, "max_steps": 7, "resume": False}}))
    p = argparse.ArgumentParser()
    add_stage_arguments(p, "data")
    base = ["--data", "x.jsonl", "--out", str(tmp_path), "--resume"]
    cfg = stage_options(p.parse_args(base), {"lr": 9.0})
    assert (cfg.lr, cfg.max_steps, cfg.resume) == (0.123, 7, True)
    assert stage_options(p.parse_args(base + ["--lr", "0.5"]), {}).lr == 0.5
