"""Run directories: bit-exact round trip, strict loading, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from minimind.checkpoint import init_run, load_run, save_run
from minimind.errors import CheckpointError
from minimind.fileio import atomic_write, atomic_write_text


def test_round_trip_is_bit_exact(tokenizer, tmp_path):
    for preset_name in ("tiny", "tiny-moe"):
        model = init_run(preset_name, tokenizer, tmp_path / preset_name, seed=3, hidden_size=64, num_layers=2)
        run = load_run(tmp_path / preset_name)
        theirs = run.model.state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, theirs[name]), name
        assert run.model.lm_head.weight is run.model.embed_tokens.weight  # still tied after loading
        assert run.cfg == model.cfg
        assert run.tokenizer.vocab_size == tokenizer.vocab_size
        assert run.info["stage"] == "init" and run.info["seed"] == 3
        # A save of the loaded run reproduces the same bytes of every tensor.
        save_run(tmp_path / "again", run.model, run.tokenizer, {"stage": "copy"})
        a, b = (
            load_file(tmp_path / preset_name / "model.safetensors"),
            load_file(tmp_path / "again" / "model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights(tokenizer, tmp_path):
    a = init_run("tiny", tokenizer, tmp_path / "a", seed=7, hidden_size=64, num_layers=2)
    b = init_run("tiny", tokenizer, tmp_path / "b", seed=7, hidden_size=64, num_layers=2)
    c = init_run("tiny", tokenizer, tmp_path / "c", seed=8, hidden_size=64, num_layers=2)
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)


def edit_weights(run_dir, edit):
    path = run_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_strict_loading_refuses_missing_tensor(tiny_run):
    edit_weights(tiny_run, lambda t: t.pop("layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.1.mlp.up_proj.weight'\]"):
        load_run(tiny_run)


def test_strict_loading_refuses_extra_tensor(tiny_run):
    edit_weights(tiny_run, lambda t: t.update({"layers.9.surprise": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers.9.surprise'\]"):
        load_run(tiny_run)


def test_strict_loading_refuses_wrong_shape(tiny_run):
    edit_weights(tiny_run, lambda t: t.update({"norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes \['norm.weight \(3,\) \(expected \(64,\)\)'\]"):
        load_run(tiny_run)


def test_corrupt_or_missing_files_are_clear_errors(tiny_run, tmp_path):
    (tiny_run / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_run(tiny_run)
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_run(tmp_path / "empty")
    (tiny_run / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a MiniMind config"):
        load_run(tiny_run)


def test_atomic_write_keeps_old_file_on_crash(tmp_path):
    target = tmp_path / "state.txt"
    atomic_write_text(target, "old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.txt"]  # no temp file left behind
