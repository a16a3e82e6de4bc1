"""The MiniMind transformer, top to bottom.

    tokens -> embedding -> N x [h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h))] -> RMSNorm -> LM head

The LM head shares its weight with the embedding; there are no biases. Attention is grouped-query
with rotary positions (optionally YaRN-scaled) and optional per-head q/k RMSNorm (minimind-3 /
Qwen3 style); the FFN is SwiGLU, or a mixture of SwiGLU experts. Every attention path (training,
prefill, cached decode, left padding, packed documents) is `F.scaled_dot_product_attention`; the
only thing that differs between them is the mask (`attention_rule`). This file computes the same
numbers on every device, in every grad mode and at every batch size. Fast paths compute them
elsewhere, each chosen explicitly by its caller and tested against this file: on GPUs, masked
attention runs in fused kernels (`minimind.attention`: FlexAttention for packed documents, expanded
k/v for padding) and MoE experts in grouped matmuls; on x86-64 CPUs the sampler runs its decode
steps through native kernels (`minimind.fastdecode`), which this file knows nothing of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minimind import attention
from minimind.attention import AttentionMask
from minimind.config import ModelConfig


def compute_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls produce on `device`: autocast's where autocast is on there, else `dtype`."""
    device_type = torch.device(device).type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), with the statistics computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused kernel
        return self.weight * normed.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Rotary position embedding with YaRN


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta^(-2i/d) and the attention factor, YaRN-scaled if configured.

    YaRN (Peng et al. 2023) keeps high-frequency dimensions (many rotations within the original
    context) as they are, divides low-frequency ones by `factor`, and blends linearly in between.
    Dimension i completes r rotations over the original context L when
        d_i(r) = d * ln(L / (2 pi r)) / (2 ln theta);
    the ramp runs from floor(d(beta_fast)) to ceil(d(beta_slow)). Logits are sharpened by
    attention_factor^2 (cos and sin are both scaled), attention_factor = 0.1 ln(factor) + 1.
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling != "yarn":
        return inv_freq, 1.0
    factor, orig = cfg.rope_factor, cfg.rope_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    attention_factor = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position id. Kept in float32 on purpose: they are plain attributes,
    not buffers, so `model.to(torch.bfloat16)` cannot round positions away."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_positions = cfg.max_position_embeddings
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and "signed" sin, each (B, 1, T, head_dim): sin's first half is negated so that
        rotate_half(x) * sin == x.roll(head_dim // 2) * signed_sin (one op instead of four)."""
        device = position_ids.device
        if device not in self._tables:
            t = torch.arange(self.max_positions, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
            self._tables[device] = (torch.cat([cos, cos], -1).to(device), torch.cat([-sin, sin], -1).to(device))
        cos, signed_sin = self._tables[device]
        return cos[position_ids].unsqueeze(1), signed_sin[position_ids].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1), computed
    in float32 as x * cos + roll(x, d/2) * (-sin1, sin2) and returned in x's dtype."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# KV cache and attention masks


class KVCache:
    """Keys and values of every layer, preallocated once: (layers, batch, kv_heads, max_len, head_dim).

    A decode step writes its keys in place; nothing is concatenated per token. `length` is the
    number of slots filled, the same for every row: prompts are left-padded to one length, and the
    attention mask marks the slots that hold no token (padding, or holes left by a continued generation).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def reserve(self, max_len: int) -> None:
        """Room for `max_len` positions (a continued generation): the filled ones are copied once."""
        if max_len <= self.max_len:
            return
        shape = (*self.k.shape[:3], max_len, self.k.shape[4])
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        n = self.length
        k[:, :, :, :n], v[:, :, :, :n] = self.k[:, :, :, :n], self.v[:, :, :, :n]
        self.k, self.v, self.max_len = k, v, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_rule(
    seq_len: int, past: int, padding_mask: torch.Tensor | None, segment_ids: torch.Tensor | None
) -> attention.Rule | None:
    """Who may attend whom, as a mask_mod(b, h, q, k) -> True where query q of row b may see key k;
    None when no mask is needed (plain causal attention, or one new token that sees the whole cache).

    Query q (absolute position past + q) sees key k when k <= past + q, the key is not padding,
    and both lie in the same packed document. A query that would see nothing (a left-pad
    position) is allowed to see itself, so attention never returns NaN; its output is never used.
    `minimind.attention` evaluates the rule at every pair (the SDPA mask) or per block (FlexAttention).
    """
    if padding_mask is None and segment_ids is None and (past == 0 or seq_len == 1):
        return None
    if segment_ids is not None and past:
        raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
    keep = None if padding_mask is None else padding_mask.bool()

    def may_attend(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ok = k <= past + q
        if keep is not None:
            ok = ok & keep[b, k]
        if segment_ids is not None:
            ok = ok & (segment_ids[b, q] == segment_ids[b, k])
        return ok | (k == past + q)

    return may_attend


def positions_from(
    seq_len: int, past: int, padding_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Position ids: count of real tokens before each one (left padding), restarting per document."""
    if padding_mask is not None:
        return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    idx = torch.arange(past, past + seq_len, device=device)[None, :]
    if segment_ids is None:
        return idx
    idx = idx.expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values


class Attention(nn.Module):
    """Grouped-query attention: num_heads query heads share num_kv_heads key/value heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, cache: KVCache | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.transpose(1, 2)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        if mask.backend == "dense":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.dense, is_causal=mask.causal, dropout_p=dropout,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )  # fmt: skip
        else:  # the same attention by a fused kernel (on GPUs; see minimind.attention)
            y = attention.attend(mask, q, k, v, dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


# --------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU, and a mixture of SwiGLU experts


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus always-on shared experts.

    p = softmax(W_g x); the k largest p_e pick the experts, y = sum_e w_e E_e(x) + sum_s S_s(x), with
    w = p (or p renormalised over the top k when norm_topk_prob and k > 1). Because w carries p,
    the router is trained by the language-model loss itself, on top of the balance loss
        aux = E * sum_e f_e * P_e,   f_e = share of routed slots that went to e, P_e = mean p_e.
    Dispatch: the (token, expert) slots are sorted by expert and every expert runs once on its
    contiguous slice, results scattered back with index_add — the same path in training and inference,
    with no loop over tokens. The slices are cut by `split` (group sizes read on the host), or, on
    GPUs, computed by `grouped` in three grouped matmuls whose group sizes stay on the device (no host
    sync per layer); `use_grouped` chooses.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.num_experts, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )
        self.shared_experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_shared_experts)
        )
        self.grouped_mm: bool | None = None  # None: `use_grouped` decides; True / False pins the path (tests)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing probabilities (N, E), chosen weights (N, k) and chosen experts (N, k)."""
        probs = self.gate(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        slots = x[token_of_slot]
        out = self.grouped(slots, counts) if self.use_grouped(x) else self.split(slots, counts)
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of_slot, out.to(x.dtype))
        for shared in self.shared_experts:
            y = y + shared(x)
        share = counts.float() / flat.numel()
        aux = self.num_experts * (share * probs.mean(dim=0)).sum()
        return y.reshape(shape), aux

    def split(self, slots: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert on its slice of the sorted slots (the sizes go to the host: a sync on GPUs)."""
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, slots.split(counts.tolist()))])

    def grouped(self, slots: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`split`'s products as grouped matmuls, W_e stacked to (E, out, in), slices delimited by the
        running sum of `counts` on the device, in the autocast dtype where autocast is on (as F.linear)."""
        dtype = compute_dtype(slots.device, slots.dtype)
        offs = counts.cumsum(0).to(torch.int32)

        def mm(a: torch.Tensor, name: str) -> torch.Tensor:
            w = torch.stack([getattr(expert, name).weight for expert in self.experts]).to(dtype)
            return F.grouped_mm(a, w.transpose(1, 2), offs=offs)

        slots = slots.to(dtype)
        return mm(F.silu(mm(slots, "gate_proj")) * mm(slots, "up_proj"), "down_proj")

    def use_grouped(self, x: torch.Tensor) -> bool:
        """Grouped matmuls where torch runs them without reading the group sizes on the host: CUDA and
        bfloat16 (Hopper and later; elsewhere torch's fallback reads them as `split` does), with
        16-byte aligned rows, and only while every expert is the plain SwiGLU of `nn.Linear`s (LoRA-wrapped
        projections take `split`; forward hooks on the experts' projections would not run)."""
        if self.grouped_mm is not None:
            return self.grouped_mm
        if not x.is_cuda:
            return False
        dtype = compute_dtype(x.device, x.dtype)
        ffn = self.experts[0].gate_proj.weight.shape[0]
        plain = all(
            type(e) is FeedForward and all(type(p) is nn.Linear for p in (e.gate_proj, e.up_proj, e.down_proj))
            for e in self.experts
        )
        return dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and ffn % 8 == 0 and plain


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.use_moe else FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + self.resid_dropout(self.self_attn(self.input_layernorm(h), cos, sin, mask, cache))
        out = self.mlp(self.post_attention_layernorm(h))
        out, aux = out if isinstance(out, tuple) else (out, h.new_zeros((), dtype=torch.float32))
        return h + self.resid_dropout(out), aux


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, vocab)
    aux_loss: torch.Tensor  # MoE balance loss times aux_loss_coef (0 for dense models)
    hidden: torch.Tensor | None = None  # (B, T, hidden) after the final norm, with return_hidden


class MiniMind(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for every matrix; residual output projections scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * self.cfg.num_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 0.02
                )
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.ones_(p)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """Logits for `input_ids` (B, T).

        attention_mask: (B, past + T), 1 for real tokens, 0 for (left) padding, covering the cached
            positions too. segment_ids: (B, T) document ids of a packed row; attention stays inside
            a document and positions restart at each. cache: filled in place and advanced by T.
            logits_to_keep: compute logits only for the last n positions (0: all).
            return_hidden: also return the final hidden states of every position (a reward head reads them).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past} used + {T} new do not fit")
        if cache is not None and cache.k.shape[:3] + cache.k.shape[4:] != (
            self.cfg.num_layers, B, self.cfg.num_kv_heads, self.cfg.head_dim
        ):  # fmt: skip
            raise ValueError(
                f"KV cache of shape {tuple(cache.k.shape)} (layers, rows, kv heads, positions, head size) does "
                f"not fit {B} rows of this model ({self.cfg.num_layers}, {B}, {self.cfg.num_kv_heads}, *, "
                f"{self.cfg.head_dim})"
            )
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({B}, {past + T}): "
                f"the {past} cached positions and the {T} new ones"
            )
        device = input_ids.device
        if position_ids is None:
            position_ids = positions_from(T, past, attention_mask, segment_ids, device)
        dropout = self.training and self.cfg.dropout > 0
        rule = attention_rule(T, past, attention_mask, segment_ids)
        mask = attention.prepare(rule, B, T, past, device, packed=segment_ids is not None, dropout=dropout)
        cos, sin = self.rotary(position_ids)
        h = self.dropout(self.embed_tokens(input_ids))
        aux = torch.zeros((), device=device)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                h, a = checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False)
            else:
                h, a = layer(h, cos, sin, mask, cache)
            aux = aux + a
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        hidden = h if return_hidden else None
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return ModelOutput(self.lm_head(h), aux * self.cfg.aux_loss_coef, hidden)

    # ---- bookkeeping -------------------------------------------------------------------------

    def num_params(self, active: bool = False) -> int:
        """Parameters counted once (tied head not twice); `active`: only the top-k routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.cfg.use_moe:
            per_expert = sum(p.numel() for p in self.layers[0].mlp.experts[0].parameters())
            total -= self.cfg.num_layers * (self.cfg.num_experts - self.cfg.num_experts_per_tok) * per_expert
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N_active + 12 L H d_head T (PaLM appendix B)."""
        c = self.cfg
        return 6 * self.num_params(active=True) + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len

    def estimate_mfu(self, tokens_per_s: float, seq_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops
