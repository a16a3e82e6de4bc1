"""Engines that spread training over processes (minimind/parallel.py), on CPU with gloo: FSDP2 gives
the same training as DDP and as one process with the same global batch; its checkpoints are ordinary
run directories; resume is exact under it and across engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minimind.data.demo import write_demo_data

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
SEQ = 32
TINY = ["--hidden-size", 64, "--num-layers", 2]


def run(args, nproc=1, check=True):
    prefix = [sys.executable, "-m", "minimind"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        prefix = launcher + ["-m", "minimind"]
    proc = subprocess.run(
        prefix + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def close(a_dir, b_dir, atol=2e-5):
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    files = write_demo_data(root / "data", scale=0.3)
    parent = root / "parent"
    run(["init", "--preset", "tiny", "--tokenizer", tokenizer_dir, "--out", parent, *TINY])
    return files, root, parent


def pretrain(setup, tokenizer_dir, out, *extra):
    files, root, _ = setup
    argv = ["pretrain", "--data", files["pretrain"], "--tokenizer", tokenizer_dir, "--preset", "tiny"]
    argv += ["--hidden-size", 64, "--num-layers", 2, "--max-seq-len", SEQ, "--lr", 3e-3, "--warmup-steps", 0]
    argv += ["--min-lr-ratio", 1, "--log-every", 1, "--cache-dir", root / "cache", "--device", "cpu", "--out", out]
    return argv + [*extra]


ENGINES = {"fsdp": ["--fsdp"], "zero2": ["--zero", 2], "zero3": ["--zero", 3]}


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_pretraining_equals_one_process_and_resumes_exactly(setup, tokenizer_dir, tmp_path, engine):
    """1 process x batch 8 == 2 processes x batch 2 x accumulation 2 under FSDP2, ZeRO-2 and ZeRO-3
    (and DDP): the gradient sync skipped on the first micro-batch, one step at the boundary. A run
    stopped at step 2 and resumed under the same engine equals the straight run bit for bit; resumed
    under DDP and by one process (checkpoints do not depend on the engine), it trains on the same."""
    flags = ENGINES[engine]
    argv = lambda out, *extra: pretrain(setup, tokenizer_dir, tmp_path / out, *extra)
    run(argv("one", "--batch-size", 8, "--accumulation", 1, "--max-steps", 4))
    run(argv("sharded", "--batch-size", 2, "--accumulation", 2, "--max-steps", 4, *flags), nproc=2)
    names = ["sharded"]
    if engine == "fsdp":
        run(argv("ddp", "--batch-size", 2, "--accumulation", 2, "--max-steps", 4), nproc=2)
        names.append("ddp")
    for name in names:
        close(tmp_path / "one", tmp_path / name)
        torch.testing.assert_close(losses(tmp_path / name), losses(tmp_path / "one"), atol=1e-4, rtol=1e-5)
    # The run directory is an ordinary one: one consolidated weight file, the config, the tokenizer.
    assert {"model.safetensors", "config.json", "tokenizer.json", "run.json"} <= {
        p.name for p in (tmp_path / "sharded").iterdir()
    }
    run(argv("cut", "--batch-size", 2, "--accumulation", 2, "--max-steps", 2, "--save-every", 2, *flags), nproc=2)
    others = (("ddp", 2), ("one", 1)) if engine != "zero2" else ()  # cross-engine: FSDP2 and ZeRO-3 carry it
    for how, nproc in (("same", 2), *others):
        out = tmp_path / f"resumed-{how}"
        subprocess.run(["cp", "-r", str(tmp_path / "cut"), str(out)], check=True)
        resume = ["pretrain", "--resume", "--data", setup[0]["pretrain"], "--out", out, "--max-steps", 4]
        run(resume + ["--device", "cpu"] + (flags if how == "same" else []), nproc=nproc)
        if how == "same":
            straight, resumed = (
                load_file(tmp_path / "sharded" / "model.safetensors"),
                load_file(out / "model.safetensors"),
            )
            assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"{engine} resume is not exact"
        else:
            close(tmp_path / "one", out)


# Each stage against one one-process reference. Reward, reasoning and distillation differ from SFT
# only in the loss and the frozen model beside the policy: FSDP2 covers them (the suite's time).
POST = {"sft": ENGINES, "lora": ENGINES, "dpo": ENGINES, "reward": ["fsdp"], "reason": ["fsdp"], "distill": ["fsdp"]}


@pytest.mark.parametrize("stage", POST)
def test_sharded_post_training_equals_one_process(setup, tmp_path, stage):
    """SFT with packed rows, LoRA (only the adapters train), DPO (a frozen, replicated reference), the
    reward model, reasoning (tag-weighted loss), distillation (a frozen, replicated teacher): FSDP2,
    ZeRO-2 and ZeRO-3 over 2 processes x batch 2 equal 1 process x batch 4 after 3 steps."""
    files, root, parent = setup
    data = {"sft": "sft", "lora": "identity", "dpo": "dpo", "reward": "dpo", "reason": "reason", "distill": "sft"}
    seq = 192 if stage == "reason" else 64  # worked traces are long
    argv = [stage, "--from", parent, "--data", files[data[stage]], "--max-seq-len", seq, "--accumulation", 1]
    argv += ["--max-steps", 3, "--lr", 1e-3, "--warmup-steps", 0, "--log-every", 1, "--cache-dir", root / "cache"]
    argv += ["--device", "cpu"]
    if stage == "lora":
        argv += ["--name", "x"]
    if stage == "distill":
        argv += ["--teacher", parent]
    out_one = tmp_path / "one"
    run(argv + ["--out", out_one, "--batch-size", 4])
    for engine in POST[stage]:
        out_two = tmp_path / engine
        run(argv + ["--out", out_two, "--batch-size", 2, *ENGINES[engine]], nproc=2)
        torch.testing.assert_close(losses(out_two), losses(out_one), atol=1e-4, rtol=1e-5, msg=engine)
        if stage == "lora":
            a = load_file(next(out_one.rglob("adapter.safetensors")))
            b = load_file(next(out_two.rglob("adapter.safetensors")))
            assert a.keys() == b.keys() and a
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=f"{engine} {k}")
        else:
            close(out_one, out_two)


def test_engine_errors_are_one_line(setup, tokenizer_dir, tmp_path):
    def error(*extra, nproc=1):
        proc = run(pretrain(setup, tokenizer_dir, tmp_path / "x", "--max-steps", 1, *extra), nproc=nproc, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr.split("ConfigError")[0][-2000:]
        return proc.stderr

    assert "--fsdp shards the model over the processes of a launched job" in error("--fsdp")
    assert "--zero/--deepspeed shard training over the processes of a launched job" in error("--zero", 2)
    assert "--fsdp and --zero/--deepspeed are two engines: choose one" in error("--fsdp", "--zero", 3)
    assert "--zero must be 1, 2 or 3" in error("--zero", 4)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    assert "remove ['optimizer']: MiniMind's AdamW, schedule and precision are used" in error("--deepspeed", config)


def test_the_deepspeed_launcher_runs_a_stage_with_offload_and_resumes_exactly(setup, tokenizer_dir, tmp_path):
    """`deepspeed --num_gpus 2 --module minimind ...` (it passes --local_rank=N before the command) with
    the ready ZeRO-3 offload config from configs/ (optimizer state and weights on the CPU, stepped by
    DeepSpeed's CPU Adam): the same training as one process with torch's AdamW. Stopped at step 2 and
    resumed (CPU Adam's state loaded from the engine-independent checkpoint), it equals the straight
    run bit for bit."""
    pytest.importorskip("deepspeed")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "deepspeed", "zero3_offload.json")
    argv = lambda out, *extra: pretrain(setup, tokenizer_dir, tmp_path / out, "--batch-size", 2, "--accumulation", 2,
                                        *extra, "--deepspeed", config)  # fmt: skip
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", "29611", "--module", "minimind"]
        + [str(a) for a in argv("ds", "--max-steps", 4)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU Adam could not be built" not in proc.stderr  # the test is about DeepSpeed's own CPU optimizer
    run(pretrain(setup, tokenizer_dir, tmp_path / "one", "--batch-size", 8, "--accumulation", 1, "--max-steps", 4))
    close(tmp_path / "one", tmp_path / "ds")
    torch.testing.assert_close(losses(tmp_path / "ds"), losses(tmp_path / "one"), atol=1e-4, rtol=1e-5)
    run(argv("cut", "--max-steps", 2, "--save-every", 2), nproc=2)
    resume = ["pretrain", "--resume", "--data", setup[0]["pretrain"], "--out", tmp_path / "cut", "--max-steps", 4]
    run(resume + ["--device", "cpu", "--deepspeed", config], nproc=2)
    straight = load_file(tmp_path / "ds" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "offload resume is not exact"


def test_swanlab_offline_keeps_the_same_record_as_metrics_jsonl(setup, tokenizer_dir, tmp_path):
    """--swanlab with no account: offline into RUN_DIR/swanlog (no prompt, no network), and the run
    file, read back with SwanLab's own reader, holds every logged metric of every logged step."""
    pytest.importorskip("swanlab")
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB")}
    argv = [sys.executable, "-m", "minimind", *map(str, pretrain(setup, tokenizer_dir, out, "--max-steps", 4))]
    proc = subprocess.run([*argv, "--log-every", "2", "--swanlab"], capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = list((out / "swanlog").glob("run-*/*.swanlab"))
    reader = DataStoreReader()
    reader.open(record)
    logged: dict[int, dict[str, float]] = {}
    for raw in reader:
        rec = record_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "scalar":
            logged.setdefault(rec.scalar.step, {})[rec.scalar.key] = rec.scalar.value.number
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == sorted(logged) == [2, 4]
    for m in metrics:
        assert logged[m["step"]].keys() == m.keys()
        for k, v in m.items():
            assert logged[m["step"]][k] == pytest.approx(v, rel=1e-6), k


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_moe_under_sharded_engines_equals_ddp(setup, tokenizer_dir, tmp_path, engine):
    """The MoE preset's experts sharded like any block (FSDP2) or partitioned (ZeRO-3): the same training
    as DDP. (Not as one process with batch 8: the balance loss is a nonlinear statistic of each
    micro-batch, so it is the same only for the same micro-batches.)"""
    argv = lambda out, *extra: pretrain(setup, tokenizer_dir, tmp_path / out, "--preset", "tiny-moe", *extra)
    run(argv("ddp", "--batch-size", 2, "--accumulation", 2, "--max-steps", 3), nproc=2)
    run(argv("sharded", "--batch-size", 2, "--accumulation", 2, "--max-steps", 3, *ENGINES[engine]), nproc=2)
    torch.testing.assert_close(losses(tmp_path / "sharded"), losses(tmp_path / "ddp"), atol=1e-5, rtol=1e-6)
    close(tmp_path / "ddp", tmp_path / "sharded")
