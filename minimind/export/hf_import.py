"""Read a transformers folder back as a MiniMind run (what `checkpoint.load_run` does for every `--from`).

Reads the architectures the export writes (Llama, Qwen3, Qwen3-MoE, GraniteMoeShared), with or without
our minimind.json (with it the round trip is exact), and upstream MiniMind's own transformers format
(model_type "minimind", both the MiniMind2 and the minimind-3 generation of its config). Anything else
is refused with a CheckpointError naming the folder and what cannot be loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from minimind.config import ModelConfig
from minimind.errors import CheckpointError, ConfigError
from minimind.export.hf import (
    GRANITE,
    MINIMIND_JSON,
    MODEL_TYPES,
    QWEN3,
    QWEN3_MOE,
    UPSTREAM,
    hf_max_positions,
)
from minimind.model import MiniMind, rope_frequencies
from minimind.rundir import CONFIG, Run, load_tensors
from minimind.tokenizer import Tokenizer


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    if (folder / "pytorch_model.bin").is_file():  # upstream MiniMind's converter writes this
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_weights(folder: Path, names_only: bool = False) -> dict[str, Any]:
    """name -> tensor (or, with names_only, name -> shape, without reading the data)."""
    out: dict[str, Any] = {}
    for file in _weight_files(folder):
        try:
            if file.suffix == ".bin":
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                out.update({k: tuple(v.shape) if names_only else v for k, v in state.items()})
            elif names_only:
                with safe_open(str(file), "pt") as f:
                    out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            else:
                out.update(load_file(str(file)))
        except (SafetensorError, OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{file}: not a readable weight file ({e})") from None
    return {k: v for k, v in out.items() if not k.endswith("rotary_emb.inv_freq")}


def _unsupported(folder: Path, arch: str, what: str, hint: str = "") -> CheckpointError:
    return CheckpointError(
        f"{folder}: {arch} with {what} cannot be loaded as a MiniMind model" + (f"; {hint}" if hint else "")
    )


def _rope(folder: Path, arch: str, data: dict[str, Any]) -> dict[str, Any]:
    params = data.get("rope_parameters") if isinstance(data.get("rope_parameters"), dict) else {}
    legacy = data.get("rope_scaling") if isinstance(data.get("rope_scaling"), dict) else {}
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    rope = params if params.get("rope_type", "default") != "default" else legacy
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": ""}
    if kind != "yarn":
        raise _unsupported(folder, arch, f"RoPE type {kind!r} (only default and yarn are supported)")
    if rope.get("mscale") or rope.get("mscale_all_dim") or rope.get("truncate") is False:
        raise _unsupported(folder, arch, "YaRN mscale/truncate settings")
    orig = rope.get("original_max_position_embeddings") or data["max_position_embeddings"]
    return {
        "rope_theta": float(theta),
        "rope_scaling": "yarn",
        "rope_factor": float(rope.get("factor") or data["max_position_embeddings"] / orig),
        "rope_original_max_position_embeddings": int(orig),
        "rope_beta_fast": float(rope.get("beta_fast", 32.0)),
        "rope_beta_slow": float(rope.get("beta_slow", 1.0)),
        "rope_attention_factor": float(rope.get("attention_factor") or 0.0),
    }


# Upstream MiniMind's config defaults: MiniMind2 (model/model_minimind.py at 0323815) and minimind-3
# (its HEAD), told apart by the q/k norm weights that only minimind-3 has.
_UPSTREAM_DEFAULTS = {
    False: dict(num_key_value_heads=2, rms_norm_eps=1e-5, num_experts_per_tok=2, n_shared_experts=1),
    True: dict(num_key_value_heads=4, rms_norm_eps=1e-6, num_experts_per_tok=1, n_shared_experts=0),
}


def _upstream_fields(folder: Path, data: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    v3 = "model.layers.0.self_attn.q_norm.weight" in shapes
    d = {**_UPSTREAM_DEFAULTS[v3], **{k: v for k, v in data.items() if v is not None}}
    hidden, heads = d.get("hidden_size", 768 if v3 else 512), d.get("num_attention_heads", 8)
    fields: dict[str, Any] = dict(
        hidden_size=hidden,
        num_layers=d.get("num_hidden_layers", 8),
        num_heads=heads,
        num_kv_heads=d["num_key_value_heads"],
        head_dim=d.get("head_dim", hidden // heads),
        vocab_size=d.get("vocab_size", 6400),
        rms_norm_eps=d["rms_norm_eps"],
        rope_theta=float(d.get("rope_theta", 1e6)),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        qk_norm=v3,
        tie_word_embeddings=d.get("tie_word_embeddings", True),
    )
    gate = "model.layers.0.mlp.gate_proj.weight"
    if not d.get("use_moe"):
        fields["intermediate_size"] = shapes[gate][0] if gate in shapes else d.get("intermediate_size", 0)
    else:
        expert = shapes.get("model.layers.0.mlp.experts.0.gate_proj.weight")
        k = d["num_experts_per_tok"]
        if d.get("scoring_func", "softmax") != "softmax":
            raise _unsupported(folder, UPSTREAM, f"scoring_func {d['scoring_func']!r}")
        if v3 and d.get("norm_topk_prob", True) and k == 1:
            raise _unsupported(folder, UPSTREAM, "top-1 routing and norm_topk_prob (every routing weight is 1)")
        width = expert[0] if expert else d.get("moe_intermediate_size") or d.get("intermediate_size") or 0
        fields.update(
            use_moe=True,
            num_experts=d.get("num_experts", d.get("n_routed_experts", 4)),
            num_experts_per_tok=k,
            num_shared_experts=0 if v3 else d["n_shared_experts"],
            intermediate_size=width,
            moe_intermediate_size=width,
            norm_topk_prob=bool(d.get("norm_topk_prob", True)) and k > 1,  # MiniMind2 skips it for top-1
            aux_loss_coef=d.get("router_aux_loss_coef", d.get("aux_loss_alpha", 0.01)),
        )
    if d.get("inference_rope_scaling"):
        if not v3:
            raise _unsupported(
                folder,
                UPSTREAM,
                "MiniMind2's inference_rope_scaling (its own RoPE formula, not YaRN)",
                'set "inference_rope_scaling": false in config.json (chat --rope-scaling yarn extends context instead)',
            )
        rope = {
            "factor": 16,
            "original_max_position_embeddings": 2048,
            "beta_fast": 32,
            "beta_slow": 1,
            "attention_factor": 1.0,
        }
        rope.update(d.get("rope_scaling") or d.get("rope_parameters") or {})  # transformers 5 moves it
        if fields["max_position_embeddings"] > rope["original_max_position_embeddings"]:  # upstream's condition
            fields.update(
                rope_scaling="yarn",
                rope_factor=float(rope["factor"]),
                rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                rope_beta_fast=float(rope["beta_fast"]),
                rope_beta_slow=float(rope["beta_slow"]),
                rope_attention_factor=float(rope["attention_factor"]),
            )
            # Upstream clamps the ramp's end at head_dim/2 - 1, we (and transformers) at head_dim - 1.
            dim, base, orig = fields["head_dim"], fields["rope_theta"], rope["original_max_position_embeddings"]
            if (
                math.ceil(dim * math.log(orig / (rope["beta_slow"] * 2 * math.pi)) / (2 * math.log(base)))
                > dim // 2 - 1
            ):
                raise _unsupported(
                    folder, UPSTREAM, "inference_rope_scaling at this rope_theta (YaRN ramp past head_dim/2)"
                )
    return fields


def _fields(folder: Path, arch: str, data: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields (special ids aside) from a transformers config.json."""
    if arch == UPSTREAM:
        return _upstream_fields(folder, data, shapes)
    if data.get("hidden_act", "silu") != "silu":
        raise _unsupported(folder, arch, f"hidden_act {data['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if data.get(flag):
            raise _unsupported(folder, arch, f"{flag} true")
    heads = data["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=data["vocab_size"],
        hidden_size=data["hidden_size"],
        num_layers=data["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or data["hidden_size"] // heads,
        intermediate_size=data["intermediate_size"],
        max_position_embeddings=data.get("max_position_embeddings", 2048),
        rms_norm_eps=data.get("rms_norm_eps", 1e-6),
        qk_norm=arch in (QWEN3, QWEN3_MOE),
        tie_word_embeddings=data.get("tie_word_embeddings", False),
        **_rope(folder, arch, data),
    )
    if arch == QWEN3_MOE:
        k, norm = data.get("num_experts_per_tok", 8), bool(data.get("norm_topk_prob", False))
        if data.get("mlp_only_layers") or data.get("decoder_sparse_step", 1) != 1:
            raise _unsupported(
                folder, arch, "dense layers between the MoE layers (mlp_only_layers/decoder_sparse_step)"
            )
        if norm and k == 1:
            raise _unsupported(folder, arch, "top-1 routing and norm_topk_prob (every routing weight is 1)")
        fields.update(
            use_moe=True,
            num_experts=data.get("num_experts") or data.get("num_local_experts"),
            num_experts_per_tok=k,
            num_shared_experts=0,
            moe_intermediate_size=data["moe_intermediate_size"],
            norm_topk_prob=norm,
            aux_loss_coef=data.get("router_aux_loss_coef", 0.001),
        )
    elif arch == GRANITE:
        width, shared, k = (
            data["intermediate_size"],
            data.get("shared_intermediate_size", 0),
            data.get("num_experts_per_tok", 2),
        )
        scaling = fields["head_dim"] ** -0.5
        multipliers = (
            data.get("embedding_multiplier", 1.0),
            data.get("residual_multiplier", 1.0),
            data.get("logits_scaling", 1.0),
        )
        if multipliers != (1.0, 1.0, 1.0) or not math.isclose(
            data.get("attention_multiplier", 1.0), scaling, rel_tol=1e-6
        ):
            raise _unsupported(folder, arch, "embedding/residual/logits/attention multipliers (MiniMind has none)")
        if k == 1 or shared % width:
            raise _unsupported(
                folder, arch, "top-1 routing" if k == 1 else "a shared MLP that is not a whole number of experts wide"
            )
        fields.update(
            use_moe=True,
            num_experts=data.get("num_local_experts", 8),
            num_experts_per_tok=k,
            num_shared_experts=shared // width,
            moe_intermediate_size=width,
            norm_topk_prob=True,
            aux_loss_coef=data.get("router_aux_loss_coef", 0.001),
        )
    return fields


def _math(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that change what the model computes, normalised (used to check minimind.json)."""
    d = cfg.to_dict()
    for k in ("dropout", "aux_loss_coef", "pad_token_id", "bos_token_id", "eos_token_id"):
        d.pop(k)
    d["rope_attention_factor"] = rope_frequencies(cfg)[1]
    d["max_position_embeddings"] = hf_max_positions(cfg)  # with YaRN the export writes original x factor
    if cfg.rope_scaling != "yarn":
        for k in ("rope_factor", "rope_original_max_position_embeddings", "rope_beta_fast", "rope_beta_slow"):
            d.pop(k)
    if cfg.use_moe:
        d.pop("intermediate_size")  # a MoE has no dense FFN
    else:
        for k in (
            "num_experts",
            "num_experts_per_tok",
            "num_shared_experts",
            "moe_intermediate_size",
            "norm_topk_prob",
        ):
            d.pop(k)
    return d


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _architecture(folder: Path, data: dict[str, Any]) -> str:
    arch = MODEL_TYPES.get(data.get("model_type", ""))
    if arch is None:
        named = (data.get("architectures") or ["?"])[0]
        raise CheckpointError(
            f"{folder / CONFIG}: not a MiniMind config, and transformers architecture {named} "
            f"(model_type {data.get('model_type')!r}) is not one MiniMind reads ({', '.join(MODEL_TYPES.values())})"
        )
    return arch


def load_hf_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json plus the chat template from tokenizer_config.json or chat_template.jinja
    (transformers 5 writes the latter)."""
    tok = Tokenizer.load(folder)
    config_file, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    config = _read_json(config_file) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str) and template != tok.chat_template:
        tok = Tokenizer(tok.backend, template, source=tok.source)
    return tok


def hf_model_config(folder: str | Path, data: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a transformers folder: minimind.json when present (checked against
    config.json), else derived from config.json, with special ids from the tokenizer."""
    folder = Path(folder)
    data = data if data is not None else _read_json(folder / CONFIG)
    arch = _architecture(folder, data)
    try:
        shapes = _read_weights(folder, names_only=True) if arch == UPSTREAM else {}  # upstream: q/k norm? widths?
        fields = _fields(folder, arch, data, shapes)
    except KeyError as e:
        raise CheckpointError(
            f"{folder / CONFIG}: not a MiniMind config, and not a complete {arch} config (no {e})"
        ) from None
    record = folder / MINIMIND_JSON
    if record.is_file():
        saved = ModelConfig.from_dict(_read_json(record)["config"])
        derived = ModelConfig.from_dict({**saved.to_dict(), **fields})
        if _math(derived) != _math(saved):
            diff = sorted(k for k, v in _math(derived).items() if _math(saved).get(k) != v)
            raise CheckpointError(
                f"{folder}: config.json disagrees with {MINIMIND_JSON} on {diff}; delete {MINIMIND_JSON} to load "
                "the model config.json describes"
            )
        return ModelConfig.from_dict({**saved.to_dict(), **overrides})
    tok = load_hf_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    ids = dict(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id) if tok else {}
    try:
        return ModelConfig.from_dict({**fields, **ids, **overrides})
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def to_minimind_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers state dict (any of the supported layouts) under our names."""
    out = {k.removeprefix("model."): v for k, v in tensors.items()}
    for i in range(cfg.num_layers):
        p, moe, shared = f"layers.{i}.mlp.", f"layers.{i}.block_sparse_moe.", f"layers.{i}.shared_mlp."
        fused = next((f for f in (moe + "input_linear.weight", p + "experts.gate_up_proj") if f in out), None)
        if fused:  # GraniteMoE on disk, or transformers 5's in-memory Qwen3-MoE layout
            gate_up = out.pop(fused)
            down = out.pop(moe + "output_linear.weight" if fused.startswith(moe) else p + "experts.down_proj")
            width = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                out[f"{p}experts.{e}.gate_proj.weight"] = gate_up[e, :width]
                out[f"{p}experts.{e}.up_proj.weight"] = gate_up[e, width:]
                out[f"{p}experts.{e}.down_proj.weight"] = down[e]
        for router in (moe + "router.layer.weight", moe + "router.weight"):
            if router in out:
                out[p + "gate.weight"] = out.pop(router)
        if shared + "input_linear.weight" in out:
            gate_up, down, w = (
                out.pop(shared + "input_linear.weight"),
                out.pop(shared + "output_linear.weight"),
                cfg.moe_intermediate_size,
            )
            half = gate_up.shape[0] // 2
            for s in range(half // w):
                out[f"{p}shared_experts.{s}.gate_proj.weight"] = gate_up[s * w : (s + 1) * w]
                out[f"{p}shared_experts.{s}.up_proj.weight"] = gate_up[half + s * w : half + (s + 1) * w]
                out[f"{p}shared_experts.{s}.down_proj.weight"] = down[:, s * w : (s + 1) * w]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # transformers ties it to the embedding whatever the file holds
    return out


def load_hf_run(folder: str | Path, device: str | torch.device = "cpu", **config_overrides: Any) -> Run:
    """A transformers folder as a Run (eval mode, on `device`); run info from minimind.json, if any."""
    folder = Path(folder)
    cfg = hf_model_config(folder, **config_overrides)
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} embeddings"
        )
    model = MiniMind(cfg)
    load_tensors(model, to_minimind_tensors(_read_weights(folder), cfg), str(folder))
    record = folder / MINIMIND_JSON
    arch = _architecture(folder, _read_json(folder / CONFIG))
    info = _read_json(record).get("run", {}) if record.is_file() else {"stage": "import", "parent": None}
    info = {**info, "imported_from": str(folder), "architecture": arch}
    return Run(model.to(device).eval(), tokenizer, info)
