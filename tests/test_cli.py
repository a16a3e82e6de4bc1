"""The `minimind` command end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minimind.data.demo import write_demo_data
from minimind.tokenizer import Tokenizer


def minimind(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "minimind", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"minimind {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """tokenizer -> init through the CLI, as the README shows."""
    root = tmp_path_factory.mktemp("cli")
    files = write_demo_data(root / "data", scale=0.1)
    minimind("tokenizer", "--data", files["pretrain"], "--vocab-size", 700, "--out", root / "tok")
    minimind(
        "init", "--preset", "tiny", "--tokenizer", root / "tok", "--out", root / "run", "--seed", 1, "--num-layers", 2
    )
    return root


def test_every_command_has_help(capsys):
    """`minimind --help` lists every command, and each command's own --help prints its usage and
    options (each command module imported and its parser built, as the CLI does)."""
    from minimind import cli

    out = minimind("--help").stdout
    for command in cli.COMMANDS:
        assert command in out
        with pytest.raises(SystemExit) as stop:
            cli.main([command, "--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: minimind " + command) and "options:" in text, command


def test_init_writes_a_complete_run(cli_run):
    run = cli_run / "run"
    assert {p.name for p in run.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "run.json",
    }
    config = json.loads((run / "config.json").read_text())
    assert config["num_layers"] == 2 and config["hidden_size"] == 128  # preset tiny with an override
    assert config["vocab_size"] == Tokenizer.load(cli_run / "tok").vocab_size <= 700  # sized to the tokenizer


def test_generate_is_seeded_and_streams(cli_run):
    args = (
        "generate",
        cli_run / "run",
        "--prompt",
        "Mia lives in",
        "--max-new-tokens",
        12,
        "--seed",
        5,
        "--temperature",
        1.0,
    )
    first, again = minimind(*args).stdout, minimind(*args).stdout
    assert first.splitlines()[0] == again.splitlines()[0]  # same seed, same text
    assert first.startswith("Mia lives in") and "tokens/s" in first
    streamed = minimind(*args, "--stream").stdout
    assert streamed.splitlines()[0] == first.splitlines()[0]  # streaming prints the same text


def test_generate_with_yarn_extends_the_context(cli_run):
    """A prompt longer than the run's 4096 positions is refused; with --rope-scaling yarn --rope-factor 4
    the table reaches 2048 x 4 = 8192 positions and the same prompt is continued."""
    prompt = "12 + 30 = 42. " * 400
    assert 4096 < len(Tokenizer.load(cli_run / "tok").encode(prompt)) < 8000
    args = ("generate", cli_run / "run", "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 0)
    refused = minimind(*args, check=False)
    assert refused.returncode == 2 and "exceeds the model's max_position_embeddings (4096)" in refused.stderr
    out = minimind(*args, "--rope-scaling", "yarn", "--rope-factor", 4)
    assert out.stdout.startswith(prompt) and "tokens/s" in out.stdout


def test_user_errors_are_one_line_without_traceback(cli_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n', encoding="utf-8")
    proc = minimind("tokenizer", "--data", bad, "--out", tmp_path / "tok", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"DataError: {bad}:2: no text found (expected a string 'text', or "
        "'conversations' / 'chosen' / 'rejected' message lists)"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    proc = minimind("tokenizer", "--data", broken, "--out", tmp_path / "tok", check=False)
    assert proc.stderr.startswith(f"DataError: {broken}:2: invalid JSON")
    proc = minimind("generate", tmp_path, "--prompt", "x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("CheckpointError:") and "not a run directory" in proc.stderr
    proc = minimind(
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        cli_run / "tok",
        "--out",
        tmp_path / "r",
        "--num-heads",
        3,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("ConfigError: invalid model config")


def test_readers_tolerate_bom_and_crlf(tmp_path):
    from minimind.data.readers import iter_texts

    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two", "extra": 1}\r\n')
    txt = tmp_path / "plain.txt"
    txt.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert list(iter_texts([path, txt])) == ["one", "two", "line one", "line two"]


def test_hardware_the_machine_lacks_is_a_one_line_error(cli_run, tmp_path, monkeypatch):
    """--device cuda without a GPU, bf16 on hardware without it, --compile without a compiler: one line
    each, saying what to do, before any training starts."""
    import torch

    from minimind import hardware
    from minimind.config import TrainConfig
    from minimind.errors import ConfigError

    files = write_demo_data(tmp_path / "data", scale=0.05)
    argv = ["pretrain", "--data", files["pretrain"], "--tokenizer", cli_run / "tok", "--preset", "tiny"]
    argv += ["--max-steps", 1, "--batch-size", 2, "--max-seq-len", 32, "--out", tmp_path / "p"]
    if not torch.cuda.is_available():
        proc = minimind(*argv, "--device", "cuda", check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (
            proc.stderr.startswith("ConfigError: --device cuda: no CUDA GPU is visible")
            and "--device cpu" in proc.stderr
        )
    proc = minimind(*argv, "--device", "warp9", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("ConfigError: --device 'warp9': not a device"), proc.stderr
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)  # an AVX2-only CPU
    with pytest.raises(ConfigError, match="--dtype bfloat16: this cpu has no bf16 hardware .* use --dtype float32"):
        hardware.precision(TrainConfig(out="x", dtype="bfloat16"), torch.device("cpu"))
    assert hardware.precision(TrainConfig(out="x"), torch.device("cpu")) == torch.float32  # auto: fp32 on CPUs
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="--compile on CPU needs a C\\+\\+ compiler"):
        hardware.check_compile(torch.device("cpu"))
