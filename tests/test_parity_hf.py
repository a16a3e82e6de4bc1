"""Parity with transformers' own implementations of the same math (Llama for plain attention,
Qwen3 for q/k norm, Qwen3-MoE for routed experts): identical fp32 logits on the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_model


def hf_model(ours, arch: str):
    import transformers

    c = ours.cfg
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=True,
        attention_bias=False,
    )
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "yarn":
        rope = {
            "rope_type": "yarn",
            "rope_theta": c.rope_theta,
            "factor": c.rope_factor,
            "original_max_position_embeddings": c.rope_original_max_position_embeddings,
        }
    if arch == "llama":
        config = transformers.LlamaConfig(**common, rope_parameters=rope, mlp_bias=False)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, rope_parameters=rope)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(
            **common,
            rope_parameters=rope,
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    state = {"model." + k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    if arch == "qwen3moe":  # transformers 5 stores experts as stacked tensors
        for i in range(c.num_layers):
            p = f"model.layers.{i}.mlp."
            experts = [
                state.pop(f"{p}experts.{e}.{n}.weight")
                for e in range(c.num_experts)
                for n in ("gate_proj", "up_proj", "down_proj")
            ]
            gate = torch.stack([torch.cat([experts[3 * e], experts[3 * e + 1]]) for e in range(c.num_experts)])
            state[p + "experts.gate_up_proj"] = gate
            state[p + "experts.down_proj"] = torch.stack([experts[3 * e + 2] for e in range(c.num_experts)])
            state[p + "gate.weight"] = state.pop(p + "gate.weight")
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize(
    "name,arch",
    [("gqa", "llama"), ("dense", "llama"), ("yarn", "llama"), ("qk_norm", "qwen3"), ("moe_top1", "qwen3moe")],
)
def test_logits_match_transformers(name, arch):
    ours = sharp_model(name)
    theirs = hf_model(ours, arch)
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
