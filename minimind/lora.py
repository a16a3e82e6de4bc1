"""LoRA, written from scratch: a frozen base plus a trained low-rank update on chosen linear layers.

    y = W x + (alpha / r) * B A dropout(x),   A: (r, in), B: (out, r)

A starts small and random (Kaiming-uniform, as in the paper's reference code) and B at zero, so a
fresh adapter leaves the model exactly as it was. Only A and B train. The wrapped layer keeps the
base weight under its old name (`...q_proj.weight`), so the base checkpoint still loads strictly
and the adapter's tensors are simply `...q_proj.lora_A` / `...q_proj.lora_B`.

An adapter directory holds `adapter.safetensors` (A and B only) and `adapter.json` (rank, alpha,
targets, the base's shape); several named adapters can sit beside one base run. Merging folds
(alpha/r) B A into W and gives back plain linear layers with the same outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minimind.errors import CheckpointError, ConfigError
from minimind.fileio import atomic_write, atomic_write_text
from minimind.options import opt

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = opt(8, "rank r of the update B A")
    alpha: float = opt(16.0, "scaling = alpha / rank")
    dropout: float = opt(0.0, "dropout on the adapter's input", flag="--lora-dropout")
    targets: list[str] = opt(list(DEFAULT_TARGETS), "comma-separated linear layer names", flag="--target",
                             parse=lambda s: [t for t in s.split(",") if t], metavar="NAMES")  # fmt: skip
    name: str = opt("adapter", "adapter name (default out: RUN_DIR/lora/NAME)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError("LoRA rank must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError("LoRA dropout must be in [0, 1)")
        if not self.targets:
            raise ConfigError("LoRA needs at least one --target layer name")


class LoRALinear(nn.Module):
    """A linear layer with a frozen weight and a trainable low-rank update (see module docstring)."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = cfg.scaling
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function (W + (alpha/r) B A)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        merged.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            merged.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        return merged


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear whose last name part is in cfg.targets; freeze everything else.

    Returns the wrapped layer names. The tied LM head is never wrapped (it is the embedding).
    """
    cfg.validate()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rpartition(".")[2] in cfg.targets and n != "lm_head"
    ]
    if not names:
        raise ConfigError(f"no linear layer matches --target {','.join(cfg.targets)} (try {','.join(DEFAULT_TARGETS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set(model, n, LoRALinear(model.get_submodule(n), cfg).train(model.training))
    return names


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if ".lora_" in n}


def base_signature(model: nn.Module) -> dict[str, Any]:
    c = model.cfg  # type: ignore[attr-defined]
    return {k: getattr(c, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")}


def save_adapter(model: nn.Module, out: str | Path, cfg: LoRAConfig, info: dict[str, Any], metadata: dict) -> None:
    """adapter.safetensors (A, B of every wrapped layer) and adapter.json, each written atomically."""
    out = Path(out)
    tensors = adapter_tensors(model)
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **metadata}))
    record = {"lora": asdict(cfg), "base": base_signature(model), **info}
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(record, indent=2, ensure_ascii=False))


def read_adapter_config(path: str | Path) -> tuple[LoRAConfig, dict[str, Any]]:
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    record = json.loads(file.read_text(encoding="utf-8"))
    return LoRAConfig(**record["lora"]), record


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Load A and B strictly into an already injected model."""
    file = Path(path) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable adapter ({e})") from None
    expected = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    wrong = [n for n in expected.keys() & tensors.keys() if tensors[n].shape != expected[n].shape]
    if missing or extra or wrong:
        raise CheckpointError(f"{file}: does not fit this model (missing {missing}, unexpected {extra}, shape {wrong})")
    with torch.no_grad():
        for n, p in expected.items():
            p.copy_(tensors[n])


def load_adapter(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Inject the adapter at `path` into `model` and load its weights; refuses a different base shape."""
    cfg, record = read_adapter_config(path)
    if record.get("base") and record["base"] != base_signature(model):
        raise CheckpointError(
            f"{path}: adapter was trained on a base of shape {record['base']}, not {base_signature(model)}"
        )
    inject(model, cfg)
    load_adapter_weights(model, path)
    return cfg


def apply_adapter(run: Any, path: str | Path) -> LoRAConfig:
    """load_adapter on a Run (chat, eval): the run then uses the chat template, as its adapter was
    trained on conversations, even when the base is a pretrained-only run."""
    cfg = load_adapter(run.model, path)
    run.info = {**run.info, "stage": "lora", "lora": str(path)}
    return cfg


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight; the model is plain again (and trainable)."""
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set(model, n, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
