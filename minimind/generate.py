"""The sampling engine: one batched, KV-cached generator for chat, eval, RL rollouts and the server.

Prompts of different lengths are left-padded to one length; positions come from the padding mask,
so a padded prompt sees exactly what it would see alone. The cache is allocated once for prompt +
new tokens. Each step applies, in order: repetition penalty, temperature, top-k, top-p, then
samples (or takes the argmax when temperature is 0) and records the log-probability of the chosen
token under the distribution it was actually drawn from — what RL needs for its ratios.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from minimind import native
from minimind.errors import ConfigError
from minimind.fastdecode import FastDecoder
from minimind.model import KVCache, MiniMind, compute_dtype


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.85  # 0: greedy
    top_p: float = 0.85  # 1: off
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the sequence
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0")


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the stop token included when one ended it
    logprobs: list[float]  # log p(token) under the distribution sampled from
    finish_reason: str  # "stop" or "length"


@dataclass
class GenerateOutput:
    generations: list[Generation]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / max(self.decode_s, 1e-9)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Sampling distribution's logits (B, V), float32. Greedy (temperature 0) skips the shaping."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > params.top_p  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (B,), their log-probs (B,)) from processed logits; `u` (B,): the rows' uniforms, else
    drawn from `generator` (or torch's global one)."""
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    if u is None:
        dtype = uniform_dtype(logits.device)
        u = torch.rand((logits.shape[0],), generator=generator, dtype=dtype, device=logits.device)
    fast = native.sample_rows(logits, u)  # the same draw in one kernel (x86-64 CPUs)
    if fast is not None:
        return fast
    logp = logits.log_softmax(dim=-1)
    tokens = draw(logp.exp(), u)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def uniform_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a bijection whose outputs look random."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_key(*parts: int) -> int:
    """One 64-bit key from integers (seed, step, row, ...): each part mixed into the last."""
    x = np.zeros(1, dtype=np.uint64)
    for part in parts:
        x = mix(x ^ np.array([part], dtype=np.uint64))
    return int(x[0])


def keyed_uniforms(keys: list[int], steps: int) -> torch.Tensor:
    """(rows, steps) uniforms in [0, 1) from a counter-based generator: row i's draw at step t is a hash
    of (keys[i], t) alone, so a row samples the same tokens whichever batch, process or world size it
    is generated in (RL rollouts under 1 or N processes draw the same completions)."""
    k = np.array(keys, dtype=np.uint64)[:, None]
    t = np.arange(steps, dtype=np.uint64)[None, :]
    bits = mix(mix(k) ^ t) >> np.uint64(11)  # 53 random bits
    return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (B, V) by inverse CDF, given u (B,) uniform in [0, 1): the first
    token whose cumulative probability exceeds u * total. One uniform per row where torch.multinomial
    draws one exponential per vocabulary entry (a tenth of a CPU decode step at batch 16). Sums are in
    u's dtype (float64; float32 on MPS) so tail tokens keep their share; the target stays strictly
    below the total, and a token of probability 0 leaves the sum flat, so it is never chosen.
    """
    cdf = probs.to(u.dtype).cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, longest prompt), prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class Continuation:
    """Rows that go on across `generate` calls with their KV cache: pass it as `continuation=` and each
    call's prompts are the *new* ids of each row (a tool result and the next reply's opening), appended
    after everything the row already holds; only they are prefilled. Multi-turn episodes use it: turn
    t + 1 costs its own tokens, not a re-prefill of the whole conversation.

    Rows are aligned by slot, not by length: a row that stopped early, or whose new ids are fewer than
    another's, leaves masked slots (holes) behind it; positions count only real tokens, so each row sees
    exactly what it would see alone. `keep(rows)` drops the rows that are done."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, cache.length): 1 where a slot holds a real token
        self.pending: list[list[int]] = []  # per row: its last sampled token, when it was not fed back yet
        self.seen: torch.Tensor | None = None  # (B, vocab) for the repetition penalty

    def keep(self, rows: list[int]) -> None:
        if self.cache is None or rows == list(range(len(self.pending))):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.cache.k.device)
        self.cache.k, self.cache.v = self.cache.k[:, index], self.cache.v[:, index]
        self.mask = self.mask[index]
        self.pending = [self.pending[i] for i in rows]
        if self.seen is not None:
            self.seen = self.seen[index]

    def record(self, full_mask: torch.Tensor, start: int, gens: list[Generation], cache: KVCache) -> None:
        """After a call: which slots hold real tokens, and which sampled tokens still wait to be fed."""
        fed = cache.length - start  # decode steps whose token went into the cache
        mask = full_mask[:, : cache.length].clone()
        for i, g in enumerate(gens):
            mask[i, start + min(len(g.tokens), fed) :] = 0  # a row that stopped fed padding after its end
        self.cache, self.mask = cache, mask
        self.pending = [g.tokens[fed:] for g in gens]


@torch.inference_mode()
def generate(
    model: MiniMind,
    prompts: list[list[int]],
    params: SamplingParams,
    on_token: Callable[[int, int], bool | None] | None = None,
    keys: list[int] | None = None,
    continuation: Continuation | None = None,
) -> GenerateOutput:
    """Continue every prompt; `on_token(row, token_id)` is called as each token is chosen.

    `keys` (one int per prompt) samples each row from its own counter-based stream (`keyed_uniforms`)
    instead of `params.seed`'s generator: the row's tokens then do not depend on its batch.

    `on_token` may return True to end that row after this token (finish reason "stop"): the server
    uses it for stop strings. An exception it raises aborts the whole generation (a cancelled request).

    `continuation` (see `Continuation`): continue its rows, `prompts` being each row's new ids; it is
    updated to hold the rows after this call.
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    cfg = model.cfg
    device = next(model.parameters()).device
    # Keys and values are cached in the dtype they are computed in: autocast's where it is on (RL rollouts
    # on GPUs; a float32 cache would be re-cast whole by every layer at every step), else the model's
    # (float32 on CPU, what the native decode kernels take).
    dtype = compute_dtype(device, next(model.parameters()).dtype)
    resumed = continuation is not None and continuation.cache is not None
    if resumed and len(prompts) != len(continuation.pending):
        raise ConfigError(f"{len(prompts)} prompts for a continuation of {len(continuation.pending)} rows")
    if resumed:
        prompts = [pending + p for pending, p in zip(continuation.pending, prompts)]
    ids, pad_mask = left_pad(prompts, cfg.pad_token_id, device)
    B, width = ids.shape
    past = continuation.cache.length if resumed else 0
    start = past + width  # the slot of the first new token
    total = start + params.max_new_tokens
    held = continuation.mask.sum(-1).max().item() if resumed else 0  # real tokens a row holds already
    if held + width + params.max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(
            f"prompt ({held + width} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings})"
        )
    padded = resumed or bool((pad_mask == 0).any())
    full_mask = torch.zeros((B, total), dtype=torch.long, device=device)
    full_mask[:, past:start] = pad_mask
    if resumed:
        full_mask[:, :past] = continuation.mask
        cache = continuation.cache
        cache.reserve(total)
    else:
        cache = KVCache(cfg, B, total, device, dtype)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    uniforms = None
    if keys is not None:
        if len(keys) != B:
            raise ConfigError(f"{len(keys)} sampling keys for {B} prompts")
        uniforms = keyed_uniforms(keys, params.max_new_tokens).to(device, uniform_dtype(device))  # one copy
    seen = None
    if params.repetition_penalty != 1.0:
        seen = continuation.seen if resumed and continuation.seen is not None else None
        if seen is None:
            seen = torch.zeros((B, cfg.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, ids, pad_mask.bool())
    stop = torch.tensor(params.stop_ids or (-1,), device=device)

    out_tokens = torch.full((B, params.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, params.max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), params.max_new_tokens, dtype=torch.long, device=device)

    decoder = FastDecoder(model)  # decode steps by native kernels where they apply (x86-64 CPUs)
    t0 = time.perf_counter()
    prefill_mask = full_mask[:, :start] if padded else None
    logits = model(ids, attention_mask=prefill_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    t_prefill = time.perf_counter()
    for step in range(params.max_new_tokens):
        u = uniforms[:, step] if uniforms is not None else None
        tokens, logp = sample(process_logits(logits, params, seen), params, generator, u)
        tokens = torch.where(done, cfg.pad_token_id, tokens)
        out_tokens[:, step], out_logp[:, step] = tokens, logp
        if seen is not None:
            seen.scatter_(1, tokens[:, None], ~done[:, None])
        hit = torch.isin(tokens, stop) & ~done
        if on_token is not None:
            ended = [
                row
                for row, (tok, was_done) in enumerate(zip(tokens.tolist(), done.tolist()))
                if not was_done and on_token(row, tok)
            ]
            if ended:  # the callback ended these rows (e.g. a stop string appeared)
                hit[ended] = True
        lengths = torch.where(hit, step + 1, lengths)
        done = done | hit
        # Checking for the end costs a host sync: do it every step only when already syncing.
        if (on_token is not None or step % 8 == 7) and bool(done.all()):
            break
        if step + 1 == params.max_new_tokens:
            break
        full_mask[:, start + step] = 1
        step_mask = full_mask[:, : start + step + 1] if padded else None
        logits = decoder.step(tokens[:, None], step_mask, cache)
        if logits is None:
            logits = model(tokens[:, None], attention_mask=step_mask, cache=cache).logits[:, -1]
    t_end = time.perf_counter()

    lengths_l, done_l = lengths.tolist(), done.tolist()
    toks, lps = out_tokens.tolist(), out_logp.tolist()
    gens = [
        Generation(toks[i][: lengths_l[i]], lps[i][: lengths_l[i]], "stop" if done_l[i] else "length") for i in range(B)
    ]
    if continuation is not None:
        continuation.record(full_mask, start, gens, cache)
        continuation.seen = seen
    return GenerateOutput(
        gens,
        prompt_tokens=sum(len(p) for p in prompts),
        new_tokens=sum(len(g.tokens) for g in gens),
        prefill_s=t_prefill - t0,
        decode_s=t_end - t_prefill,
    )
