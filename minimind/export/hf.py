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

Reading such folders back (and upstream MiniMind's own) is `minimind.export.hf_import`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minimind import __version__
from minimind.config import ModelConfig
from minimind.errors import CheckpointError, ConfigError
from minimind.model import MiniMind, rope_frequencies
from minimind.rundir import CONFIG, Run, git_commit, weight_names
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


def hf_max_positions(cfg: ModelConfig) -> int:
    """max_position_embeddings of the export: with YaRN, original_max_position_embeddings x factor.

    transformers 4 recomputes YaRN's factor as max_position_embeddings / original_max_position_embeddings
    whenever the latter is given (its `factor` is then ignored, frequencies included); transformers 5
    uses `factor` (and warns on a mismatch). Only max_position_embeddings = original x factor reads the
    same in both, and it is what YaRN means: the context the original one was stretched to.
    """
    if cfg.rope_scaling != "yarn":
        return cfg.max_position_embeddings
    return round(cfg.rope_original_max_position_embeddings * cfg.rope_factor)


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
        "max_position_embeddings": hf_max_positions(cfg),
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
