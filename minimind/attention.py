"""Masked attention without the math kernel: the fused paths beside the spec in `minimind.model`.

The spec is one `F.scaled_dot_product_attention` call with a dense boolean mask: the rule "query i
may see key j" (`minimind.model.attention_rule`) evaluated at every pair by `dense_mask`. On CUDA
that call runs in the math kernel whenever there is a mask and grouped-query heads (flash attention
takes no explicit mask, the memory-efficient kernel no GQA), which materialises B x H x T x T scores:
every SFT, LoRA, reasoning and distillation batch (packed rows), `--doc-mask` pretraining and every
padded prefill. Two kernels compute the same attention instead:

- "flex": FlexAttention with a BlockMask made from the same rule, so whole blocks outside a document
  are skipped and GQA stays native. For packed rows (segment_ids) on CUDA, where it is compiled
  (`torch.compile`; eager FlexAttention gives the same values slowly, which is what the CPU tests run).
  It has no dropout: packed rows with dropout take "expanded".
- "expanded": keys and values repeated to the query heads (repeat_interleave), which the
  memory-efficient kernel needs before it takes the (B, 1, T, L) boolean mask. For padding on CUDA.
- "dense": the spec, everywhere else: on CPU (it is the reference, and fast enough there), for plain
  causal attention (flash takes is_causal with GQA) and for one new token per row (its scores are only
  B x H x L; on CPU the native decode kernels take that step).

`choose` picks per forward pass by device; `forced` pins a backend (the parity tests use it on CPU).
Masks are prepared once per forward pass (`prepare`) and shared by every layer: no per-layer work and
no host sync on the way to the kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# mask_mod(b, h, q_idx, kv_idx) -> bool tensor, True where query q_idx of row b may see key kv_idx
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("dense", "flex", "expanded")

_forced: str | None = None


@contextmanager
def forced(backend: str | None) -> Iterator[None]:
    """Within the block, every masked attention of more than one query per row uses `backend`."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def choose(device: torch.device, seq_len: int, packed: bool, dropout: bool) -> str:
    """The backend for a masked attention of `seq_len` queries per row (see the module docstring)."""
    if seq_len == 1:
        return "dense"
    if _forced is not None:
        return _forced
    if device.type != "cuda":
        return "dense"
    return "flex" if packed and not dropout else "expanded"


@dataclass(frozen=True)
class AttentionMask:
    """How every layer of one forward pass attends. `rule` None: no mask (plain causal attention when
    `causal`, else one new token per row that sees the whole cache)."""

    backend: str = "dense"
    causal: bool = True
    dense: torch.Tensor | None = None  # (B, 1, T, L) bool, True = may attend ("dense", "expanded")
    block_mask: BlockMask | None = None  # "flex"


def dense_mask(rule: Rule, batch: int, seq_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """The rule evaluated at every (row, query, key): a (B or 1, 1, T, L) boolean mask."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    q = torch.arange(seq_len, device=device).view(1, 1, -1, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return rule(b, torch.zeros((), dtype=torch.long, device=device), q, k)


def prepare(
    rule: Rule | None, batch: int, seq_len: int, past: int, device: torch.device, *, packed: bool, dropout: bool
) -> AttentionMask:
    """The mask of one forward pass in the form its backend takes, built once for all layers."""
    if rule is None:
        return AttentionMask(causal=past == 0)
    backend = choose(device, seq_len, packed, dropout)
    if backend == "flex":
        make = compiled(create_block_mask) if device.type == "cuda" else create_block_mask
        return AttentionMask("flex", False, block_mask=make(rule, batch, None, seq_len, past + seq_len, device=device))
    return AttentionMask(backend, False, dense=dense_mask(rule, batch, seq_len, past + seq_len, device))


def attend(mask: AttentionMask, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v by the fused backend `mask.backend` ("flex" or "expanded").

    q: (B, H, T, D); k, v: (B, KVH, L, D) with H a multiple of KVH. Returns (B, H, T, D)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "flex":
        if dropout_p:
            raise ValueError("FlexAttention has no dropout: use the 'expanded' or 'dense' attention backend")
        flex = compiled(flex_attention) if q.device.type == "cuda" else flex_attention
        return flex(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if mask.backend == "expanded":
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, dropout_p=dropout_p)
    raise ValueError(f"attend() takes the fused backends, not {mask.backend!r}")


_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """`fn` (flex_attention, create_block_mask) compiled on first use: eager, FlexAttention materialises
    the scores as math SDPA does, and create_block_mask the (B, T, L) mask. Compiled once per process
    (wrapping at import would load dynamo, seconds); each forward pass's rule is a new closure of the
    same code, which dynamo guards by code and closed-over tensors, so batches do not recompile. In a
    model that is itself being compiled, `fn` as it is: it becomes part of that graph."""
    if torch.compiler.is_compiling():
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]
