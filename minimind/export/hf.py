"""Transformers folders: export a run as one, and read one back as a run.

Export picks the transformers architecture whose forward pass is *exactly* ours, so nothing
custom (no `trust_remote_code`) is needed to load it:

    dense, no q/k norm                       -> LlamaForCausalLM
    dense, q/k norm                          -> Qwen3ForCausalLM
    MoE, q/k norm, no shared experts         -> Qwen3MoeForCausalLM (norm_topk_prob either way)
    MoE, no q/k norm, top-k>1 renormalised   -> GraniteMoeSharedForCausalLM (ungated shared experts
                                                summed into one wider SwiGLU; multipliers set to 1)

Anything else (e.g. q/k norm together with shared experts: Qwen3-MoE has none, Qwen2-MoE gates
its shared expert with a sigmoid) is refused with a CheckpointError rather than written as a
different model. The folder holds config.json, model.safetensors (tensor names as the real
checkpoints of that architecture have them), generation_config.json, the tokenizer with its chat
template, and minimind.json (our ModelConfig and run record, so reading it back is exact).

Import (`load_hf_run`, reached through `checkpoint.load_run`) reads those four architectures,
with or without minimind.json, and upstream MiniMind's own transformers format (model_type
"minimind", both the MiniMind2 and the minimind-3 generation of its config).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from minimind import __version__
from minimind.checkpoint import CONFIG, Run, git_commit, load_tensors, weight_names
from minimind.config import ModelConfig
from minimind.errors import CheckpointError, ConfigError
from minimind.model import MiniMind, rope_frequencies
from minimind.tokenizer import BOS, EOS, PAD, Tokenizer

MINIMIND_JSON = "minimind.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMA, QWEN3, QWEN3_MOE = "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
GRANITE, UPSTREAM = "GraniteMoeSharedForCausalLM", "MiniMindForCausalLM"
MODEL_TYPES = {
    "llama": LLAMA,
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3_MOE,
    "granitemoeshared": GRANITE,
    "minimind": UPSTREAM,
}


# ---- export ------------------------------------------------------------------------------------


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what MiniMind(cfg) computes, or CheckpointError."""
    if not cfg.use_moe:
        return QWEN3 if cfg.qk_norm else LLAMA
    if cfg.qk_norm and cfg.num_shared_experts == 0:
        return QWEN3_MOE
    if not cfg.qk_norm and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        return GRANITE
    if cfg.qk_norm:
        why = (
            f"q/k norm together with {cfg.num_shared_experts} shared expert(s): Qwen3-MoE has q/k norm but no "
            "shared experts, and the transformers models with shared experts either gate them (Qwen2-MoE: "
            "sigmoid), route with sigmoid scores (DeepSeek-V3, GLM-4-MoE) or apply q/k norm after RoPE (HunYuan)"
        )
    else:
        why = (
            f"no q/k norm and {'top-1 routing' if cfg.num_experts_per_tok == 1 else 'norm_topk_prob false'}: "
            "the transformers MoE models without q/k norm (Mixtral, GraniteMoE, Ernie-4.5-MoE) all renormalise "
            "the top-k routing weights, which differs from weighting each expert by its router probability"
        )
    raise CheckpointError(
        f"this MoE has no exact transformers equivalent ({why}); MoE shapes that export are q/k norm with "
        "--num-shared-experts 0 (Qwen3-MoE), or no q/k norm with --norm-topk-prob true and top-k > 1 (GraniteMoeShared)"
    )


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    """rope_theta/rope_scaling (read by transformers 4 and 5) plus transformers 5's rope_parameters."""
    if cfg.rope_scaling != "yarn":
        return {
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        }
    yarn = {
        "rope_type": "yarn",
        "factor": cfg.rope_factor,
        "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        "beta_fast": cfg.rope_beta_fast,
        "beta_slow": cfg.rope_beta_slow,
        "attention_factor": rope_frequencies(cfg)[1],  # explicit: both sides then use the same value
    }
    return {
        "rope_theta": cfg.rope_theta,
        "rope_scaling": yarn,
        "rope_parameters": {**yarn, "rope_theta": cfg.rope_theta},
    }


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for the architecture `hf_architecture(cfg)` names."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {', '.join(DTYPES)} for --format hf")
    arch = hf_architecture(cfg)
    model_type = {v: k for k, v in MODEL_TYPES.items()}[arch]
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        **_rope_fields(cfg),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype,  # transformers 4
        "dtype": dtype,  # transformers 5
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if arch == LLAMA:
        config.update(mlp_bias=False, pretraining_tp=1)
    elif arch == QWEN3:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    elif arch == QWEN3_MOE:
        config.update(
            num_experts=cfg.num_experts,  # transformers 4
            num_local_experts=cfg.num_experts,  # transformers 5
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=cfg.aux_loss_coef,
            output_router_logits=False,
            use_sliding_window=False,
            sliding_window=None,
        )
    else:  # GRANITE: its expert width is `intermediate_size`; the multipliers make it plain Llama math
        config.update(
            intermediate_size=cfg.moe_intermediate_size,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            shared_intermediate_size=cfg.num_shared_experts * cfg.moe_intermediate_size,
            router_aux_loss_coef=cfg.aux_loss_coef,
            output_router_logits=False,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            attention_multiplier=cfg.head_dim**-0.5,
        )
    return config


def hf_tensors(model: MiniMind, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under the on-disk names of `hf_architecture(model.cfg)` (a tied head stored once)."""
    cfg, state = model.cfg, model.state_dict()
    out = {k if k == "lm_head.weight" else f"model.{k}": state[k] for k in weight_names(model)}
    if hf_architecture(cfg) == GRANITE:
        for i in range(cfg.num_layers):
            p, moe = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
            experts = [
                [out.pop(f"{p}experts.{e}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")]
                for e in range(cfg.num_experts)
            ]
            out[moe + "input_linear.weight"] = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
            out[moe + "output_linear.weight"] = torch.stack([d for _, _, d in experts])
            out[moe + "router.layer.weight"] = out.pop(p + "gate.weight")
            if cfg.num_shared_experts:
                shared = [
                    [out.pop(f"{p}shared_experts.{s}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")]
                    for s in range(cfg.num_shared_experts)
                ]
                gates, ups, downs = zip(*shared)  # one SwiGLU of width S*I: [gates; ups] rows, downs side by side
                out[f"model.layers.{i}.shared_mlp.input_linear.weight"] = torch.cat([*gates, *ups])
                out[f"model.layers.{i}.shared_mlp.output_linear.weight"] = torch.cat(downs, dim=1)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """Our sampling defaults (minimind.generate.SamplingParams); eos lists every stop id."""
    from minimind.generate import SamplingParams

    s = SamplingParams()
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": list(tokenizer.stop_ids),
        "pad_token_id": tokenizer.pad_id,
        "do_sample": True,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,  # 0: off, as in ours (transformers' own default would be 50)
        "repetition_penalty": s.repetition_penalty,
        "max_new_tokens": s.max_new_tokens,
    }


def save_hf_model(model: MiniMind, out: str | Path, dtype: str = "float32") -> None:
    """config.json + model.safetensors only (what AutoModelForCausalLM reads); export_hf adds the rest."""
    config = hf_config(model.cfg, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(model, DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def export_hf(run: Run, out: str | Path, dtype: str = "float32") -> None:
    """Write a transformers folder for `run` at `out`, built in a temporary folder beside it and
    renamed into place: `out` is never half-written. A folder from an earlier export is replaced."""
    out = Path(out)
    hf_config(run.cfg, dtype)  # refuse an unsupported model or dtype before writing anything
    if out.exists() and any(out.iterdir()) and not (out / MINIMIND_JSON).is_file():
        raise CheckpointError(f"{out} exists and is not an earlier export; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_hf_model(run.model, tmp, dtype)
        tok = run.tokenizer
        tok.save(tmp)
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(tok), indent=2), encoding="utf-8")
        record = {
            "format_version": 1,
            "config": run.cfg.to_dict(),
            "run": run.info,
            "export": {"minimind_version": __version__, "git_commit": git_commit(), "dtype": dtype},
        }
        (tmp / MINIMIND_JSON).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported {hf_architecture(run.cfg)} ({dtype}) -> {out}")


# ---- import ------------------------------------------------------------------------------------


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
