"""Typed configuration: the model's shape, its presets, and `--key value` overrides.

A preset is a named `ModelConfig`; every field can be overridden from the command line
(`--hidden-size 256`) because the CLI builds its flags from the dataclass fields. The presets
reproduce upstream MiniMind's published parameter counts (tests pin them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from minimind.errors import ConfigError
from minimind.options import opt


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width: 8/3 of the hidden size rounded up to a multiple of 64 (MiniMind2's rule)."""
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


@dataclass
class ModelConfig:
    """Shape of a decoder-only MiniMind transformer.

    Token ids the model itself relies on: `bos_token_id` starts a document, `eos_token_id` ends one
    (and stops generation), `pad_token_id` fills left-padded batches.
    """

    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_heads
    intermediate_size: int = 0  # 0: default_intermediate_size(hidden_size)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    qk_norm: bool = False
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    # RoPE, rotate-half form, with optional YaRN scaling ("yarn" or "" for none).
    rope_theta: float = 1e6
    rope_scaling: str = ""
    rope_factor: float = 4.0
    rope_original_max_position_embeddings: int = 2048
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0  # 0: YaRN's default 0.1 * ln(factor) + 1
    # Mixture of experts (ignored unless use_moe).
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    num_shared_experts: int = 1
    moe_intermediate_size: int = 0  # 0: intermediate_size
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.01
    # Special token ids.
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size == 0:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    def validate(self) -> None:
        """Refuse shapes that would build a broken model, with a message that says how to fix it."""
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_scaling not in ("", "yarn"):
            problems.append(f"rope_scaling must be '' or 'yarn', got {self.rope_scaling!r}")
        if self.use_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts")
            if self.norm_topk_prob and self.num_experts_per_tok == 1:
                # Renormalising a single weight makes it exactly 1: the router would get no gradient
                # from the language-model loss (a bug upstream MiniMind shipped).
                problems.append(
                    "norm_topk_prob with num_experts_per_tok=1 fixes the routing weight at 1 and "
                    "starves the router of gradient; set --norm-topk-prob false"
                )
        if self.vocab_size <= max(self.pad_token_id, self.bos_token_id, self.eos_token_id):
            problems.append(f"vocab_size ({self.vocab_size}) is smaller than the special token ids")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        return cls(**d)


_MINIMIND3 = dict(
    hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, qk_norm=True, intermediate_size=2432, rms_norm_eps=1e-6
)
_TINY = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, max_position_embeddings=4096)

PRESETS: dict[str, dict[str, Any]] = {
    # Upstream MiniMind2 family (rms eps 1e-5, no q/k norm).
    "minimind2-small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2),  # 25.83M
    "minimind2": dict(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2),  # 104.03M
    "minimind2-moe": dict(
        hidden_size=640,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
    ),  # 145.03M
    # Upstream minimind-3 family (q/k norm, 4 kv heads, FFN ceil(pi * d / 64) * 64).
    "minimind3": _MINIMIND3,  # 63.91M
    "minimind3-moe": dict(
        _MINIMIND3, use_moe=True, num_experts=4, num_experts_per_tok=1, num_shared_experts=0, norm_topk_prob=False
    ),  # 198.42M
    # Small enough to train on a laptop CPU in minutes: tests and the demo.
    "tiny": _TINY,
    "tiny-moe": dict(
        _TINY, use_moe=True, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, intermediate_size=256
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def preset_of(cfg: ModelConfig) -> str | None:
    """The preset whose shape `cfg` has (vocabulary aside), or None for a custom shape."""
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "use_moe", "num_experts")
    for name in PRESETS:
        ref = preset(name)
        if all(getattr(ref, k) == getattr(cfg, k) for k in keys):
            return name
    return None


@dataclass
class TrainConfig:
    """Options of the training engine, shared by every stage (stages add their own on top)."""

    # the run and its rows
    out: str = opt("", "the run directory this stage writes", metavar="RUN_DIR")
    max_seq_len: int = opt(512, "tokens per row")
    batch_size: int = opt(32, "rows per micro-batch per process")
    accumulation: int = opt(8, "micro-batches per optimizer step")

    # the optimizer and the schedule
    optimizer: str = opt("adamw", "adamw | muon (Muon on the blocks' matrices, AdamW on embeddings, head, norms)")
    lr: float = opt(5e-4, "peak learning rate")
    schedule: str = opt("cosine", "cosine | wsd (warmup, constant, linear decay over the last --decay-share)")
    decay_share: float = opt(0.2, "wsd: the share of the run spent decaying")
    min_lr_ratio: float = opt(0.1, "the schedule ends at lr * min_lr_ratio")
    warmup_steps: int = opt(-1, "linear warmup steps; -1: 1% of the steps, at least 1")
    weight_decay: float = opt(0.1, "AdamW's decoupled weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")

    # how long, where, how
    epochs: int = opt(1, "passes over the data")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0: as many as --epochs take")
    max_time: str = opt(
        "", "a wall-clock budget (90s, 30m, 1.5h) from the command's start; the schedule ends with it", metavar="TIME"
    )
    seed: int = opt(42, "seed of the data order, initial weights and sampling")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16")
    compile: bool = opt(False, "torch.compile the model")
    grad_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")

    # checkpoints, data errors, logging
    save_every: int = opt(0, "write a checkpoint every N steps; 0: only at the end")
    log_every: int = opt(10, "print and log every N steps")
    eval_every: int = opt(0, "with --eval-data: log val_loss and val_bpb every N steps and at the end; 0: off")
    resume: bool = opt(False, "continue the run in --out exactly where it stopped")
    doc_mask: bool = opt(False, "keep attention inside each packed document")
    skip_bad_lines: bool = opt(False, "skip malformed records (counted and reported) instead of stopping")
    cache_dir: str = opt("", "token caches (default: $MINIMIND_CACHE or ~/.cache/minimind, /tokens)", metavar="DIR")
    wandb: bool = opt(False, "log to Weights & Biases")
    swanlab: bool = opt(False, "log to SwanLab; offline (RUN_DIR/swanlog) unless SWANLAB_MODE or SWANLAB_API_KEY")
    tensorboard: bool = opt(False, "log to TensorBoard (RUN_DIR/tensorboard)")

    # engines (DDP is any launch with several processes)
    fsdp: bool = opt(False, "FSDP2 under torchrun: weights, gradients and optimizer state sharded per block")
    zero: int = opt(0, "DeepSpeed ZeRO stage 1, 2 or 3 (under deepspeed or torchrun)")
    deepspeed: str = opt("", "a DeepSpeed JSON config (zero_optimization, offload)", metavar="FILE.json")

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out RUN_DIR is required")
        for name in ("max_seq_len", "batch_size", "accumulation", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer must be adamw or muon, not {self.optimizer!r}")
        if self.optimizer == "muon" and (self.zero or self.deepspeed):
            raise ConfigError("--optimizer muon needs whole matrices: use DDP or --fsdp, not DeepSpeed ZeRO")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"schedule must be cosine or wsd, not {self.schedule!r}")
        if not 0 < self.decay_share <= 1:
            raise ConfigError(f"decay_share must be in (0, 1], not {self.decay_share}")
        if self.eval_every < 0:
            raise ConfigError("eval_every must be 0 (off) or a number of steps")
        self.time_budget()

    def time_budget(self) -> float | None:
        """--max-time in seconds (None: no budget). Accepts 90, 90s, 30m, 1.5h."""
        text = self.max_time.strip().lower()
        if not text:
            return None
        unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1])
        try:
            seconds = float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            seconds = -1.0
        if not seconds > 0 or math.isinf(seconds):
            raise ConfigError(f"--max-time {self.max_time!r}: give a positive time such as 90s, 30m or 1.5h")
        return seconds
