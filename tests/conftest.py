"""Shared fixtures: a tokenizer trained on the built-in demo corpus and tiny model configs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.demo import pretrain_texts
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (and in the subprocesses they start). Two threads
    # per worker oversubscribe the cores and made some tests 10x slower.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# The venv's tools (ninja, the deepspeed launcher) come first on every subprocess's PATH. DeepSpeed
# compiles its CPU Adam op once with whichever `ninja` is on PATH; a system ninja of another version
# discards the other's build log and rebuilds the op (~50 s on 2 cores) every time the two alternate.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

# Tiny shapes that still exercise every feature: GQA, q/k norm, MoE, YaRN.
TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512)
CONFIGS = {
    "dense": dict(TINY, num_kv_heads=4),
    "gqa": TINY,
    "qk_norm": dict(TINY, qk_norm=True),
    "yarn": dict(TINY, rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=32),
    "moe": dict(TINY, use_moe=True, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, intermediate_size=96),
    "moe_top1": dict(
        TINY,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=1,
        num_shared_experts=0,
        norm_topk_prob=False,
        qk_norm=True,
        intermediate_size=96,
    ),
}


def tiny_config(name: str = "gqa", **overrides) -> ModelConfig:
    return ModelConfig(**{**CONFIGS[name], **overrides})


def sharp_model(name: str = "gqa", **overrides) -> MiniMind:
    """A tiny model with large random weights: peaked attention and logits, so that any error in
    masking, positions or caching moves the output well beyond float32 noise."""
    model = MiniMind(tiny_config(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    return model.eval()


# What makes a test slow: the trained pipeline (minutes to build, once per session), or several
# processes launched (torchrun, deepspeed). `pytest -m "not slow"` is the inner loop; `make test` runs all.
SLOW_FIXTURES = {"pipeline"}
SLOW_FILES = {"test_parallel.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    texts = pretrain_texts(600, seed=1) + ["Hello, world! 你好，世界。🙂 emoji 😀 and digits 12345"] * 5
    return Tokenizer.train(texts, vocab_size=600)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save(path)
    return path


@pytest.fixture
def tiny_run(tokenizer, tmp_path):
    """A freshly initialised `tiny` run directory sized to the session tokenizer."""
    from minimind.checkpoint import init_run

    init_run("tiny", tokenizer, tmp_path / "run", seed=0, hidden_size=64, num_layers=2)
    return tmp_path / "run"


def _run_cli(*args) -> str:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "minimind", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _build_pipeline(root, seed: int = 0) -> dict:
    """demo data -> tokenizer -> pretrain (tiny) -> SFT -> LoRA identity adapter, all through the CLI."""
    from minimind.data.demo import write_demo_data
    from minimind.data.readers import iter_texts

    files = write_demo_data(root / "data", scale=0.5)
    tok = Tokenizer.train(iter_texts([files["pretrain"], files["sft"]]), vocab_size=1024)
    tok.save(root / "tokenizer")
    common = ["--max-seq-len", 128, "--batch-size", 16, "--accumulation", 1, "--log-every", 50]
    common += ["--cache-dir", root / "cache", "--seed", seed]
    logs = {}
    logs["pretrain"] = _run_cli(
        "pretrain", "--data", files["pretrain"], "--tokenizer", root / "tokenizer", "--preset", "tiny",
        "--out", root / "pretrain", "--lr", 3e-3, "--max-steps", 200, "--warmup-steps", 10, *common,
    )  # fmt: skip
    logs["sft"] = _run_cli(
        "sft", "--from", root / "pretrain", "--data", files["sft"], "--eval-data", files["sft_heldout"],
        "--out", root / "sft", "--max-steps", 200, "--warmup-steps", 10, *common,
    )  # fmt: skip
    logs["lora"] = _run_cli(
        "lora", "--from", root / "sft", "--data", files["identity"], "--name", "identity",
        "--max-steps", 80, "--warmup-steps", 5, *common,
    )  # fmt: skip
    return {
        "files": files,
        "tokenizer": root / "tokenizer",
        "pretrain": root / "pretrain",
        "sft": root / "sft",
        "lora": root / "sft" / "lora" / "identity",
        "logs": logs,
    }


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The demo pipeline at test scale, built once per test session even under xdist (file lock).
    MINIMIND_TEST_PIPELINE=DIR keeps it in DIR across sessions (while developing: saves minutes);
    MINIMIND_TEST_SEED=N trains it with --seed N (default 0), to check that learning tests hold for
    other seeds, not only the one they were tuned on."""
    import fcntl
    import json
    from pathlib import Path

    base = tmp_path_factory.getbasetemp()
    under_xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    shared = (base.parent if under_xdist else base) / "pipeline"  # one per session
    if os.environ.get("MINIMIND_TEST_PIPELINE"):
        shared = Path(os.environ["MINIMIND_TEST_PIPELINE"])
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "done.json"
        if not done.exists():
            result = _build_pipeline(shared, int(os.environ.get("MINIMIND_TEST_SEED", "0")))
            done.write_text(json.dumps(result, default=str))
        data = json.loads(done.read_text())
    data["files"] = {k: Path(v) for k, v in data["files"].items()}
    for k in ("tokenizer", "pretrain", "sft", "lora"):
        data[k] = Path(data[k])
    return data


@pytest.fixture(scope="session")
def tool_run(tmp_path_factory):
    """A small model SFT-trained on the demo's tool conversations (calls the calculator on most sums):
    (run dir, data dir). Built once per worker in ~20 s."""
    from minimind.checkpoint import init_run
    from minimind.data.demo import agent_records, pretrain_texts, tool_eval_records, tool_sft_records, write_jsonl
    from minimind.data.readers import iter_texts

    root = tmp_path_factory.mktemp("tools")
    write_jsonl(root / "tool_sft.jsonl", tool_sft_records(400, 1))
    write_jsonl(root / "agent.jsonl", agent_records(64, 1))
    write_jsonl(root / "tools_heldout.jsonl", tool_eval_records(16, 2, held_out=True))
    texts = pretrain_texts(300, seed=1) + list(iter_texts([root / "tool_sft.jsonl"]))
    init_run("tiny", Tokenizer.train(texts, vocab_size=1024), root / "init", seed=0, hidden_size=64, num_layers=2)
    _run_cli(
        "sft", "--from", root / "init", "--data", root / "tool_sft.jsonl", "--out", root / "sft",
        "--max-seq-len", 320, "--batch-size", 8, "--accumulation", 1, "--lr", 3e-3, "--max-steps", 100,
        "--warmup-steps", 5, "--cache-dir", root / "cache", "--seed", 0,
    )  # fmt: skip
    return root / "sft", root
