"""What a run directory is, below everything that reads or writes one: its file names, the `Run` a
loaded one becomes, the weight names as stored (a tied head once) and the strict loading of named
tensors into a model. `checkpoint` saves and loads runs with these; the transformers importer and
exporter (minimind/export/) use them without importing `checkpoint`, which loads their folders.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind.config import ModelConfig
from minimind.errors import CheckpointError
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer

WEIGHTS, CONFIG, RUN_INFO = "model.safetensors", "config.json", "run.json"
CHECKPOINTS, LATEST = "checkpoints", "latest"
FORMAT_VERSION = 1


def weight_names(model: MiniMind) -> list[str]:
    """State-dict keys as stored on disk: the tied LM head is the embedding, stored once."""
    names = list(model.state_dict().keys())
    if model.cfg.tie_word_embeddings:
        names.remove("lm_head.weight")
    return names


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
