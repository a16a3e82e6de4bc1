"""`minimind export RUN --format gguf --out FILE.gguf`: one file for llama.cpp and ollama.

The file is written with `gguf.GGUFWriter` (the llama.cpp project's own writer), straight from our
state_dict: llama.cpp's `convert_hf_to_gguf.py` is not installable and rejects custom BPE vocabularies.

Which llama.cpp architecture runs our math exactly (checked against llama.cpp's model code):

    dense                      qk_norm -> qwen3           else -> llama
    MoE, no shared experts     qk_norm -> qwen3moe        else -> llama (Mixtral-style experts)
    MoE, shared experts        glm4moe (q/k norm optional, softmax router, top-k renormalisation
                               and shared-expert count read from the file)

Two rope layouts: our attention rotates halves, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with
x1 = x[:d/2]; llama.cpp's `llama` arch rotates neighbouring pairs (x[2i], x[2i+1]). Rotating q and k
is a dot-product-preserving change of basis only if both are stored in the layout the kernel
expects, so for `llama` the rows of every q/k head are reordered: new row 2i = old row i, new row
2i + 1 = old row i + d/2. The other archs use the NeoX (rotate-half) kernel and take rows as they are.

qwen3moe and llama's MoE always renormalise the top-k router weights, w_e = p_e / sum_topk p, even
for k = 1 (where that makes w = 1). A model trained with norm_topk_prob false uses w_e = p_e, so it
goes to glm4moe, whose renormalisation is a flag; without shared experts it gets one all-zero
shared expert there (adds exactly 0, costs one expert's memory per layer).

YaRN: llama.cpp reads `rope.scaling.{type,factor,original_context_length,attn_factor}` and applies
mscale = attn_factor * (1 + 0.1 ln factor); our attention factor A is written as A / (1 + 0.1 ln factor).
It does not read beta_fast / beta_slow for these archs (fixed 32 / 1), so other values are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.config import ModelConfig
from minimind.errors import ConfigError
from minimind.fileio import atomic_write, atomic_write_text
from minimind.rundir import Run
from minimind.tokenizer import BOS, EOS, PAD, SPLIT_PATTERN, Tokenizer

DTYPES = ("f32", "f16", "q8_0")


# ---- which architecture ----------------------------------------------------------------------


def choose_arch(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what MiniMind computes (see module doc)."""
    if not cfg.use_moe:
        return "qwen3" if cfg.qk_norm else "llama"
    renormalised = cfg.norm_topk_prob and cfg.num_experts_per_tok > 1
    if cfg.num_shared_experts == 0 and renormalised:
        return "qwen3moe" if cfg.qk_norm else "llama"
    return "glm4moe"


def check_rope(cfg: ModelConfig) -> None:
    if cfg.rope_scaling == "yarn" and (cfg.rope_beta_fast, cfg.rope_beta_slow) != (32.0, 1.0):
        raise ConfigError(
            f"YaRN beta_fast/beta_slow {cfg.rope_beta_fast}/{cfg.rope_beta_slow}: llama.cpp does not read them "
            "from a GGUF file for this architecture and always uses 32/1, so the export would differ"
        )


def yarn_mscale(factor: float) -> float:
    """Default YaRN attention factor, 0.1 ln(factor) + 1 (1 for factor <= 1), as both sides compute it."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


# ---- tokenizer -------------------------------------------------------------------------------


def pre_tokenizer_name(tok: Tokenizer) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the split this tokenizer actually does.

    Ours: Qwen2's regex, then byte-level without its own regex -> "qwen2". Upstream MiniMind's:
    byte-level with the GPT-2 regex -> "gpt-2". Anything else would tokenise differently in
    llama.cpp (and an unknown name makes it refuse the file), so it is refused here.
    """
    data = json.loads(tok.backend.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    where = tok.source or "tokenizer"
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(f"{where}: only byte-level BPE tokenizers can be exported to GGUF")
    if data.get("normalizer"):
        raise ConfigError(f"{where}: has a normalizer ({data['normalizer'].get('type')}); llama.cpp would not apply it")

    def is_byte_level(p: dict, use_regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex") == use_regex

    if is_byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == SPLIT_PATTERN
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and is_byte_level(steps[1], False)
    ):
        return "qwen2"
    raise ConfigError(
        f"{where}: pre-tokenizer {pre.get('type')!r} has no llama.cpp equivalent (expected ours or GPT-2's)"
    )


def add_tokenizer(writer: Any, tok: Tokenizer, cfg: ModelConfig, chat: bool) -> None:
    """Tokens (padded with unused entries up to the embedding size), types, merges, special ids."""
    from gguf import TokenType

    data = json.loads(tok.backend.to_str())
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [TokenType.UNUSED] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for i, added in tok.backend.get_added_tokens_decoder().items():
        # Special tokens are control tokens (matched in text only with special=True, hidden when
        # decoding); the others (<think>, ...) stay visible and are always matched, as in tokenizers.
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_unk_token_id(tok.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat:
        writer.add_chat_template(tok.chat_template)


# ---- tensors ---------------------------------------------------------------------------------


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (0..d/2-1 | d/2..d-1) to pairs (0, d/2, 1, d/2+1, ...)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our state_dict under llama.cpp's tensor names, in the layout `arch` expects."""
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES

    def name(kind: T, bid: int | None = None, suffix: str = "weight") -> str:
        return TENSOR_NAMES[kind].format(bid=bid) + "." + suffix

    out = {name(T.TOKEN_EMBD): state["embed_tokens.weight"], name(T.OUTPUT_NORM): state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out[name(T.OUTPUT)] = state["lm_head.weight"]
    permute = arch == "llama"
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if permute:
            q, k = interleave_rope_rows(q, cfg.num_heads), interleave_rope_rows(k, cfg.num_kv_heads)
        out[name(T.ATTN_NORM, i)] = state[p + "input_layernorm.weight"]
        out[name(T.ATTN_Q, i)], out[name(T.ATTN_K, i)] = q, k
        out[name(T.ATTN_V, i)] = state[p + "self_attn.v_proj.weight"]
        out[name(T.ATTN_OUT, i)] = state[p + "self_attn.o_proj.weight"]
        if cfg.qk_norm:
            out[name(T.ATTN_Q_NORM, i)] = state[p + "self_attn.q_norm.weight"]
            out[name(T.ATTN_K_NORM, i)] = state[p + "self_attn.k_norm.weight"]
        # glm4moe calls the pre-FFN norm "post_attention_norm"; the others "ffn_norm".
        ffn_norm = T.ATTN_POST_NORM if arch == "glm4moe" else T.FFN_NORM
        out[name(ffn_norm, i)] = state[p + "post_attention_layernorm.weight"]
        m = p + "mlp."
        if not cfg.use_moe:
            for kind, proj in ((T.FFN_GATE, "gate_proj"), (T.FFN_UP, "up_proj"), (T.FFN_DOWN, "down_proj")):
                out[name(kind, i)] = state[f"{m}{proj}.weight"]
            continue
        out[name(T.FFN_GATE_INP, i)] = state[m + "gate.weight"]
        for kind, proj in ((T.FFN_GATE_EXP, "gate_proj"), (T.FFN_UP_EXP, "up_proj"), (T.FFN_DOWN_EXP, "down_proj")):
            out[name(kind, i)] = torch.stack([state[f"{m}experts.{e}.{proj}.weight"] for e in range(cfg.num_experts)])
        if arch != "glm4moe":
            continue
        # Shared experts are summed, which is one SwiGLU of their concatenated hidden units.
        shared = range(cfg.num_shared_experts)
        gate = [state[f"{m}shared_experts.{s}.gate_proj.weight"] for s in shared]
        up = [state[f"{m}shared_experts.{s}.up_proj.weight"] for s in shared]
        down = [state[f"{m}shared_experts.{s}.down_proj.weight"] for s in shared]
        if not gate:  # no shared expert: an all-zero one adds exactly nothing
            zeros = torch.zeros(cfg.moe_intermediate_size, cfg.hidden_size)
            gate, up, down = [zeros], [zeros], [zeros.T]
        out[name(T.FFN_GATE_SHEXP, i)] = torch.cat(gate, 0)
        out[name(T.FFN_UP_SHEXP, i)] = torch.cat(up, 0)
        out[name(T.FFN_DOWN_SHEXP, i)] = torch.cat(down, 1)
        # glm4moe requires a selection bias (added to the router probabilities to pick experts only).
        out[name(T.FFN_EXP_PROBS_B, i, "bias")] = torch.zeros(cfg.num_experts)
    return out


def encode_tensor(tname: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw type) for the writer. 1-D tensors (norms, biases) and the router stay float32
    (llama.cpp's own converters do the same: routing decisions are sensitive to rounding); q8_0
    needs rows in blocks of 32, so a tensor whose rows are not falls back to f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    arr = t.detach().to(torch.float32).cpu().contiguous().numpy()
    if dtype == "f32" or arr.ndim == 1 or ".ffn_gate_inp." in tname:
        return arr, Q.F32
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quantize(arr, Q.Q8_0), Q.Q8_0
    return arr.astype(np.float16), Q.F16


# ---- metadata --------------------------------------------------------------------------------


def add_hparams(writer: Any, cfg: ModelConfig, arch: str, dtype: str) -> None:
    from gguf import ExpertGatingFuncType, LlamaFileType, RopeScalingType

    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    # llama's Mixtral-style experts take their width from feed_forward_length.
    moe_in_ff = cfg.use_moe and arch == "llama"
    writer.add_feed_forward_length(cfg.moe_intermediate_size if moe_in_ff else cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[dtype])
    if cfg.rope_scaling == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_position_embeddings)
        if cfg.rope_attention_factor:
            writer.add_rope_scaling_attn_factors(cfg.rope_attention_factor / yarn_mscale(cfg.rope_factor))
    if cfg.use_moe:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "glm4moe":
        writer.add_expert_shared_count(max(cfg.num_shared_experts, 1))
        writer.add_leading_dense_block_count(0)
        writer.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX)
        writer.add_expert_weights_norm(cfg.norm_topk_prob and cfg.num_experts_per_tok > 1)
        writer.add_expert_weights_scale(1.0)


# ---- ollama ----------------------------------------------------------------------------------

# Our ChatML template in ollama's Go-template form (the system prompt is one of the messages).
OLLAMA_CHATML = (
    "{{- range .Messages }}" + BOS + "{{ .Role }}\n{{ .Content }}" + EOS + "\n{{ end }}" + BOS + "assistant\n"
)


def modelfile_text(gguf_name: str, chat: bool, num_ctx: int) -> str:
    """An ollama Modelfile: the weights, the prompt template, when to stop, default sampling
    (our chat's defaults: temperature 0.85, top_p 0.85)."""
    template = OLLAMA_CHATML if chat else "{{ .Prompt }}"
    lines = [
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f'PARAMETER stop "{EOS}"',
        f'PARAMETER stop "{PAD}"',
        "PARAMETER temperature 0.85",
        "PARAMETER top_p 0.85",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


# ---- entry point -----------------------------------------------------------------------------


def export_gguf(run: Run, out_path: str | Path, dtype: str = "f16") -> Path:
    """Write `out_path` (.gguf) and an ollama Modelfile next to it; return the .gguf path."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter

    out = Path(out_path)
    if out.suffix != ".gguf":
        raise ConfigError(f"--out for --format gguf must be a file ending in .gguf, got {str(out)!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype for gguf must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg, tok = run.cfg, run.tokenizer
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} embeddings")
    check_rope(cfg)
    arch = choose_arch(cfg)
    pre_tokenizer_name(tok)  # refuse an unsupported tokenizer before any work
    state = {k: v.detach().float().cpu() for k, v in run.model.state_dict().items()}
    tensors = {k: encode_tensor(k, v, dtype) for k, v in gguf_tensors(state, cfg, arch).items()}

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, arch)
        writer.add_name(out.stem)
        add_hparams(writer, cfg, arch, dtype)
        if dtype == "q8_0":
            writer.add_quantization_version(GGML_QUANT_VERSION)
        add_tokenizer(writer, tok, cfg, run.is_chat)
        for tname, (data, raw_type) in tensors.items():
            writer.add_tensor(tname, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    modelfile = out.with_suffix(".Modelfile")
    atomic_write_text(modelfile, modelfile_text(out.name, run.is_chat, cfg.max_position_embeddings))
    tag = re.sub(r"[^a-z0-9._-]+", "-", out.stem.lower()).strip("-.") or "minimind"
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out} ({arch}, {dtype}, {size_mb:.1f} MiB) and {modelfile}")
    print(f"  ollama:    ollama create {tag} -f {modelfile} && ollama run {tag}")
    if run.is_chat:
        print(f"  llama.cpp: llama-cli -m {out}")
    else:
        print(f'  llama.cpp: llama-completion -m {out} -p "Once upon a time" -n 128')
    return out
