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
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimind import __version__
from minimind.config import ModelConfig
from minimind.errors import CheckpointError
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

WEIGHTS, CONFIG, RUN_INFO = "model.safetensors", "config.json", "run.json"
CHECKPOINTS, LATEST = "checkpoints", "latest"
FORMAT_VERSION = 1


def write_point(what: str) -> None:
    """Called just before each change a checkpoint save makes on disk (a rename, a link, a removal).
    Does nothing; the fault-injection tests replace it to kill a save at every one of these points."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        write_point(f"rename {path}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


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
        write_point(f"clear {path}")
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
        write_point(f"publish {dst}")
        os.replace(tmp, dst)
    for old in (run_dir / CHECKPOINTS).iterdir():
        if old.is_dir() and old.name != folder.name:
            write_point(f"remove {old}")
            shutil.rmtree(old)


def weight_names(model: MiniMind) -> list[str]:
    """State-dict keys as stored on disk: the tied LM head is the embedding, stored once."""
    names = list(model.state_dict().keys())
    if model.cfg.tie_word_embeddings:
        names.remove("lm_head.weight")
    return names


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


def load_tensors(model: MiniMind, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of named tensors (the tied head may be absent); errors name `source` and the tensors."""
    expected = model.state_dict()
    names = set(weight_names(model))
    missing, extra = sorted(names - tensors.keys()), sorted(tensors.keys() - names)
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(names & tensors.keys())
        if tensors[k].shape != expected[k].shape
    ]
    if missing or extra or wrong:
        parts = [
            f"missing tensors {missing}" if missing else "",
            f"unexpected tensors {extra}" if extra else "",
            f"wrong shapes {wrong}" if wrong else "",
        ]
        raise CheckpointError(f"{source}: does not match config.json: " + "; ".join(p for p in parts if p))
    tensors = dict(tensors)
    if model.cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True)


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


TEXT_STAGES = ("pretrain", "init")  # runs that never saw the chat template: they continue text


@dataclass
class Run:
    model: MiniMind
    tokenizer: Tokenizer
    info: dict[str, Any]

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def is_chat(self) -> bool:
        """Whether prompts go through the chat template (any run past pretraining, except a student
        distilled on text)."""
        if self.info.get("stage") == "distill":
            return self.info.get("distill", {}).get("format") != "text"
        return self.info.get("stage") not in TEXT_STAGES


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
    from minimind.config import PRESETS, add_dataclass_args

    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=42)
    add_dataclass_args(
        p,
        ModelConfig,
        skip=("pad_token_id", "bos_token_id", "eos_token_id"),
        title="model overrides (on top of the preset)",
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
    from minimind.config import dataclass_overrides

    model = init_run(
        args.preset, Tokenizer.load(args.tokenizer), args.out, args.seed, **dataclass_overrides(args, ModelConfig)
    )
    c = model.cfg
    active = f", {model.num_params(active=True) / 1e6:.2f}M active" if c.use_moe else ""
    print(
        f"initialised {args.preset}: {model.num_params() / 1e6:.2f}M parameters{active} "
        f"({c.num_layers} layers x {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, vocab {c.vocab_size}) "
        f"-> {args.out}"
    )
