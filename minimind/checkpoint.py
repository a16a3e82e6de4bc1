"""Run directories: the unit that stages hand each other.

    RUN_DIR/
      model.safetensors     weights (safetensors only; a tied LM head is stored once)
      config.json           the ModelConfig, plus "model_type": "minimind" and a format version
      tokenizer.json, tokenizer_config.json
      run.json              how it was made: stage, parent run, seed, git commit, time

Every file is written to a temporary name in the same directory and renamed into place, so a
crash leaves either the old file or the new one, never half of one. Loading is strict: a missing,
unexpected or misshapen tensor is an error that names it.

Training checkpoints (what `--resume` reads) are whole run directories of their own, switched by a
pointer written last, so the last complete checkpoint survives a crash at any point of a save:

    RUN_DIR/checkpoints/step-00001200/   weights, config, tokenizer, run.json, train_state.pt (+ critic/ ...)
    RUN_DIR/checkpoints/latest           "step-00001200": written (atomically) once that folder is complete
    RUN_DIR/model.safetensors, ...       the latest checkpoint's files, hard-linked (no second copy on disk)

A save writes the new step folder beside the old one, switches `latest`, publishes its files into
RUN_DIR, and only then removes the older folder (`publish_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimind import __version__, fileio
from minimind.config import ModelConfig
from minimind.errors import CheckpointError
from minimind.fileio import atomic_write, atomic_write_text
from minimind.model import MiniMind
from minimind.rundir import (  # noqa: F401 (the run format's names, imported from here across the package)
    CHECKPOINTS,
    CONFIG,
    FORMAT_VERSION,
    LATEST,
    RUN_INFO,
    TEXT_STAGES,
    WEIGHTS,
    Run,
    git_commit,
    load_tensors,
    weight_names,
)
from minimind.tokenizer import Tokenizer


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder of the last complete training checkpoint of a run (None: no checkpoint yet)."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    return Path(run_dir) / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path | None:
    """A fresh folder for the checkpoint of `step` (a leftover of an interrupted save is cleared), or
    None when `step` is the latest complete checkpoint already."""
    path = Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"
    if path == latest_checkpoint(run_dir):
        return None
    if path.exists():
        fileio.write_point(f"clear {path}")
        shutil.rmtree(path)
    return path


def publish_checkpoint(run_dir: str | Path, folder: Path) -> None:
    """Make the complete checkpoint in `folder` the run's: switch `latest` to it, hard-link each of
    its files into the run directory (a copy where the file system has no hard links), then remove
    the older checkpoint folders. A crash at any point leaves `latest` naming a complete folder."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / CHECKPOINTS / LATEST, folder.name)
    for src in sorted(folder.rglob("*")):
        if src.is_dir() or src.name.startswith("."):
            continue
        dst = run_dir / src.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        fileio.write_point(f"publish {dst}")
        os.replace(tmp, dst)
    for old in (run_dir / CHECKPOINTS).iterdir():
        if old.is_dir() and old.name != folder.name:
            fileio.write_point(f"remove {old}")
            shutil.rmtree(old)


def save_weights(model: MiniMind, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().cpu() for k in weight_names(model)}
    meta = {"format": "pt", "minimind": __version__, **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(model: MiniMind, path: str | Path) -> None:
    """Load strictly: every expected tensor present, nothing extra, every shape right."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    load_tensors(model, tensors, str(path))


def save_config(cfg: ModelConfig, run_dir: str | Path) -> None:
    data = {"model_type": "minimind", "format_version": FORMAT_VERSION, **cfg.to_dict()}
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(data, indent=2))


def read_config_json(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG}); create one with `minimind init`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def is_transformers_folder(data: dict[str, Any]) -> bool:
    """A config.json that is not our run format (ours: model_type minimind with a format_version)."""
    return data.get("model_type") != "minimind" or "format_version" not in data


def load_config(run_dir: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a run directory, or of a transformers folder (minimind.export.hf_import)."""
    data = read_config_json(run_dir)
    if is_transformers_folder(data):
        from minimind.export.hf_import import hf_model_config

        return hf_model_config(run_dir, data, **overrides)
    data.pop("model_type")
    version = data.pop("format_version")
    if version != FORMAT_VERSION:
        path = Path(run_dir) / CONFIG
        raise CheckpointError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    return ModelConfig.from_dict({**data, **overrides})


def save_run(
    run_dir: str | Path,
    model: MiniMind,
    tokenizer: Tokenizer,
    info: dict[str, Any],
    weights_metadata: dict[str, str] | None = None,
) -> None:
    """Write a complete run directory (weights, config, tokenizer, provenance)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / WEIGHTS, weights_metadata)
    save_config(model.cfg, run_dir)
    tokenizer.save(run_dir)
    record = {
        "minimind_version": __version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
    }
    atomic_write_text(run_dir / RUN_INFO, json.dumps(record, indent=2, ensure_ascii=False))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", **config_overrides: Any) -> Run:
    """Model (in eval mode, on `device`), tokenizer and provenance of a run directory.

    config_overrides change inference-time settings such as rope_scaling / rope_factor; they
    may not change any tensor's shape (strict loading would refuse it). A transformers folder
    (our export, Llama, Qwen3, Qwen3-MoE, GraniteMoeShared, upstream MiniMind) loads too, converted exactly.
    """
    run_dir = Path(run_dir)
    if is_transformers_folder(read_config_json(run_dir)):
        from minimind.export.hf_import import load_hf_run

        return load_hf_run(run_dir, device, **config_overrides)
    cfg = load_config(run_dir, **config_overrides)
    model = MiniMind(cfg)
    load_weights(model, run_dir / WEIGHTS)
    tokenizer = Tokenizer.load(run_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{run_dir}: tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings"
        )
    info_path = run_dir / RUN_INFO
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    return Run(model.to(device).eval(), tokenizer, info)


# ---- CLI: minimind init --preset NAME --tokenizer DIR --out RUN_DIR [--seed 42] --------------


def add_arguments(p: Any) -> None:
    from minimind.config import PRESETS
    from minimind.options import add_options

    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=42)
    add_options(
        p, ModelConfig, "model overrides (on top of the preset)", skip=("pad_token_id", "bos_token_id", "eos_token_id")
    )


def new_model(
    preset_name: str, tokenizer: Tokenizer, seed: int = 42, min_positions: int = 0, **overrides: Any
) -> MiniMind:
    """The preset's model sized to the tokenizer (its special ids too), initialised from `seed`; the
    position table covers at least `min_positions` (e.g. the training --max-seq-len)."""
    from minimind.config import PRESETS, preset

    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    if overrides["vocab_size"] < tokenizer.vocab_size:
        raise CheckpointError(
            f"vocab_size {overrides['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size} ids"
        )
    if min_positions:
        table = PRESETS[preset_name].get("max_position_embeddings", 32768)
        overrides.setdefault("max_position_embeddings", max(table, min_positions))
    cfg = preset(
        preset_name,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        **overrides,
    )
    torch.manual_seed(seed)
    return MiniMind(cfg)


def init_run(preset_name: str, tokenizer: Tokenizer, out: str | Path, seed: int = 42, **overrides: Any) -> MiniMind:
    """A freshly initialised run directory: the preset's model sized to the tokenizer."""
    model = new_model(preset_name, tokenizer, seed, **overrides)
    save_run(
        out,
        model,
        tokenizer,
        {
            "stage": "init",
            "parent": None,
            "preset": preset_name,
            "seed": seed,
            "tokenizer": tokenizer.source,
            "overrides": overrides,
        },
    )
    return model


def main(args: Any) -> None:
    from minimind.options import given

    model = init_run(args.preset, Tokenizer.load(args.tokenizer), args.out, args.seed, **given(args, ModelConfig))
    c = model.cfg
    active = f", {model.num_params(active=True) / 1e6:.2f}M active" if c.use_moe else ""
    print(
        f"initialised {args.preset}: {model.num_params() / 1e6:.2f}M parameters{active} "
        f"({c.num_layers} layers x {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, vocab {c.vocab_size}) "
        f"-> {args.out}"
    )
