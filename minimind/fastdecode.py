"""Decode steps by the native kernels: what `MiniMind.forward` computes for one new token per row with a
KV cache, on x86-64 CPUs, where BLAS and torch's small-op overheads are most of a step's time.

The sampler (`minimind.generate`) chooses this path explicitly, one `FastDecoder` per `generate` call, for
its decode steps only; the model file knows nothing of it, and every other caller (training, evaluation,
reward scoring, the prefill) computes with the model's own torch code whatever its grad mode or row count.

Two plans, fixed when the decoder is made (the module tree does not change during a generate call):
- "fused": every layer the plain dense block (`nn.Linear` projections without bias, `RMSNorm`s, SwiGLU):
  the whole step is one kernel call, `native.decode_step`, reading `STEP_WEIGHTS` weights per layer.
- "modules": MoE layers or LoRA-wrapped projections: the layers are walked here, norms, plain
  projections and attention by the per-module kernels, anything else (experts, LoRA updates) by its own
  module in torch.
A model with a forward hook on any module (FSDP, DeepSpeed ZeRO-3, a user's probe), in training with
dropout, or on another device or dtype gets no plan: the model's forward runs, so the hooks do too.
Both plans are checked against the model in tests/test_native.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from minimind import native
from minimind.model import Attention, Block, FeedForward, KVCache, MiniMind, RMSNorm, positions_from


def has_hooks(model: nn.Module) -> bool:
    """Whether a forward (pre-)hook is registered globally or on any module (it would not run here)."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.bias is None


def step_weights(model: MiniMind) -> list[torch.Tensor | None] | None:
    """Per layer, the 11 weights `native.decode_step` reads (decode.c's order; None for an absent q/k
    norm), or None unless every layer is the plain dense block with the model's shapes."""
    c = model.cfg
    if not plain_linear(model.lm_head) or type(model.norm) is not RMSNorm:
        return None
    out: list[torch.Tensor | None] = []
    for layer in model.layers:
        if type(layer) is not Block or type(layer.self_attn) is not Attention or type(layer.mlp) is not FeedForward:
            return None
        a, f = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm) + ((a.q_norm, a.k_norm) if a.qk_norm else ())
        projs = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj)
        if any(type(n) is not RMSNorm or n.eps != c.rms_norm_eps for n in norms) or not all(map(plain_linear, projs)):
            return None
        qn, kn = (a.q_norm.weight, a.k_norm.weight) if a.qk_norm else (None, None)
        weights = [layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, qn, kn]
        weights += [a.o_proj.weight, layer.post_attention_layernorm.weight]
        weights += [f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight]
        q, kv, ffn = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, f.gate_proj.weight.shape[0]
        shapes = [(c.hidden_size,), (q, c.hidden_size), (kv, c.hidden_size), (kv, c.hidden_size)]
        shapes += [(c.head_dim,), (c.head_dim,)] if a.qk_norm else [None, None]
        shapes += [(c.hidden_size, q), (c.hidden_size,)]
        shapes += [(ffn, c.hidden_size), (ffn, c.hidden_size), (c.hidden_size, ffn)]
        if any(t is not None and tuple(t.shape) != shape for t, shape in zip(weights, shapes)):
            return None
        out += weights
    return out


class FastDecoder:
    """`decoder.step(tokens, attention_mask, cache)`: the logits (B, V) of one decode step, or None where
    the native path does not apply (the caller then runs the model). Make one per generate call."""

    def __init__(self, model: MiniMind):
        self.model = model
        self.plan: str | None = None
        self.weights: list[torch.Tensor | None] | None = None
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32 or native.load() is None:
            return  # checked in this order: a GPU run never builds (or warns about) the CPU kernels
        if (model.training and model.cfg.dropout > 0) or has_hooks(model):
            return
        self.weights = step_weights(model)
        self.plan = "fused" if self.weights is not None else "modules"

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor | None:
        """tokens (B, 1); attention_mask None or (B, past + 1) covering the cache; the cache advances by one."""
        if self.plan is None or torch.is_grad_enabled():
            return None
        model, past = self.model, cache.length
        position_ids = positions_from(1, past, attention_mask, None, tokens.device)
        cos, sin = model.rotary(position_ids)  # (B or 1, 1, 1, head_dim)
        keep = None
        if attention_mask is not None:  # the new token always sees itself, as in attention_rule
            keep = attention_mask != 0
            keep[:, -1] = True
        h = model.embed_tokens(tokens)
        if self.plan == "fused" and tokens.shape[0] <= native.MAX_STEP_ROWS:
            c = model.cfg
            out = native.decode_step(
                self.weights, model.norm.weight, model.lm_head.weight, h[:, 0], cos[:, 0, 0], sin[:, 0, 0], keep,
                cache, c.num_heads, c.num_kv_heads, c.rms_norm_eps,
            )  # fmt: skip
            if out is not None:
                cache.length += 1
                return out[0]
        mask = None if keep is None else keep[:, None, None, :]
        for i, layer in enumerate(model.layers):
            h = self.layer(layer, h, cos, sin, mask, cache)
            if h is None:
                if i:  # the kernel's conditions are the same in every layer
                    raise RuntimeError(f"native decode attention applied to layer 0 but not to layer {i}")
                return None
        cache.length += 1
        return self.linear(model.lm_head, self.norm(model.norm, h))[:, 0]

    def layer(
        self, layer: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor | None:  # fmt: skip
        """`Block.forward` for one token per row (h (B, 1, D)) with the per-module kernels; None, having
        written nothing, where native attention does not apply."""
        a, (B, _, _) = layer.self_attn, h.shape
        x = self.norm(layer.input_layernorm, h)
        q = self.linear(a.q_proj, x).view(B, 1, a.num_heads, a.head_dim)
        k = self.linear(a.k_proj, x).view(B, 1, a.num_kv_heads, a.head_dim)
        v = self.linear(a.v_proj, x).view(B, 1, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.norm(a.q_norm, q), self.norm(a.k_norm, k)
        y = native.decode_attention(q, k, v, cos, sin, cache, a.layer_idx, mask)  # RoPE, cache write, attention
        if y is None:
            return None
        h = h + self.linear(a.o_proj, y.view(B, 1, -1))
        x = self.norm(layer.post_attention_layernorm, h)
        if type(layer.mlp) is FeedForward:
            f = layer.mlp
            return h + self.linear(f.down_proj, F.silu(self.linear(f.gate_proj, x)) * self.linear(f.up_proj, x))
        out = layer.mlp(x)  # MoE: routing and experts in torch
        return h + (out[0] if isinstance(out, tuple) else out)

    @staticmethod
    def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A plain projection by the kernel; anything else (a LoRA-wrapped one) by its own module."""
        y = native.decode_linear(x, m.weight, m.bias) if type(m) is nn.Linear else None
        return m(x) if y is None else y

    @staticmethod
    def norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = native.decode_rmsnorm(x, m.weight, m.eps) if type(m) is RMSNorm else None
        return m(x) if y is None else y
