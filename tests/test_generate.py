"""The sampling engine: seeding, filters, the log-probs it reports, stopping, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_model

from minimind.errors import ConfigError
from minimind.generate import Continuation, SamplingParams, draw, generate, keyed_uniforms, process_logits, row_key

PROMPTS = [[5, 17, 42, 9], [7, 7, 100], [300, 12, 13, 14, 15, 16]]


def tokens(out):
    return [g.tokens for g in out.generations]


def test_seeded_sampling_is_repeatable():
    model = sharp_model("gqa")
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=11)
    assert tokens(generate(model, PROMPTS, p)) == tokens(generate(model, PROMPTS, p))
    other = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=12)
    assert tokens(generate(model, PROMPTS, p)) != tokens(generate(model, PROMPTS, other))


def test_keyed_rows_sample_the_same_tokens_in_any_batch():
    """With `keys`, a row's tokens depend on its key only: alone, in another batch or another order
    (as 1 process and N processes hold an RL rollout's rows), it samples the same; other keys sample
    other tokens. The uniforms are uniform and uncorrelated across steps and rows."""
    model = sharp_model("gqa")
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0)
    keys = [row_key(0, 5, i) for i in range(3)]
    together = tokens(generate(model, PROMPTS, p, keys=keys))
    alone = [tokens(generate(model, [q], p, keys=[k]))[0] for q, k in zip(PROMPTS, keys)]
    swapped = tokens(generate(model, PROMPTS[::-1], p, keys=keys[::-1]))[::-1]
    assert together == alone == swapped
    assert together != tokens(generate(model, PROMPTS, p, keys=[row_key(1, 5, i) for i in range(3)]))
    u = keyed_uniforms([row_key(0, 1, i) for i in range(20_000)], 8)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    corr = torch.corrcoef(u.T)[~torch.eye(8, dtype=torch.bool)]
    assert corr.abs().max() < 0.04  # 20k samples: standard error 0.007
    with pytest.raises(ConfigError, match="2 sampling keys for 3 prompts"):
        generate(model, PROMPTS, p, keys=keys[:2])


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = sharp_model("moe")
    greedy = tokens(generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0)))
    assert (
        tokens(generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=0))) == greedy
    )
    assert (
        tokens(generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=0)))
        == greedy
    )


def test_logprobs_are_those_of_the_sampled_distribution():
    """Recomputing each chosen token's log-prob from a full forward pass, with the same
    temperature/top-k/top-p shaping, gives the log-probs the engine reported (RL relies on it)."""
    model = sharp_model("qk_norm")
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    out = generate(model, PROMPTS, params)
    for prompt, gen in zip(PROMPTS, out.generations):
        seq = torch.tensor([prompt + gen.tokens])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1 : -1]
        logp = process_logits(logits, params, None).log_softmax(-1)
        expected = logp.gather(-1, torch.tensor(gen.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=1e-4, rtol=1e-4)
        assert all(lp > float("-inf") for lp in gen.logprobs)


def test_inverse_cdf_draw_follows_the_distribution_and_never_picks_a_zero():
    """`draw` (one uniform per row) samples each token with its probability: frequencies over 200k
    draws match within 5 standard errors, tokens of probability 0 (top-k/top-p cut them) never come,
    a lone token at the end of the vocabulary is drawn even for u next to 1, and the same u gives the
    same tokens."""
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.0, 0.15, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    freq = torch.bincount(draw(probs[:1].expand(n, -1), u), minlength=7).double() / n
    p = probs[0].double()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), freq
    edge = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)
    assert draw(probs[1:].expand(2, -1), edge).tolist() == [6, 6]
    assert draw(probs[:1].expand(2, -1), edge).tolist() == [0, 5]
    assert torch.equal(draw(probs, u[:2]), draw(probs, u[:2].clone()))


def test_stop_tokens_end_rows_independently():
    model = sharp_model("gqa")
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0)).generations
    stop = free[0].tokens[3]  # make row 0 stop at its 4th token
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0, stop_ids=(stop,))).generations
    first = free[0].tokens.index(stop)
    assert out[0].tokens == free[0].tokens[: first + 1] and out[0].finish_reason == "stop"
    for f, o in zip(free[1:], out[1:]):
        n = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert o.tokens == f.tokens[:n]
        assert o.finish_reason == ("stop" if stop in f.tokens else "length")


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_reduces_repeats():
    model = sharp_model("gqa")

    def repeats(penalty):
        out = generate(model, PROMPTS, SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=penalty))
        return sum(len(g.tokens) - len(set(g.tokens)) for g in out.generations)

    assert repeats(3.0) < repeats(1.0)


def test_streaming_callback_sees_every_token_in_order():
    model = sharp_model("gqa")
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    out = generate(
        model,
        PROMPTS,
        SamplingParams(max_new_tokens=9, temperature=1.0, seed=1, stop_ids=(3, 4, 5)),
        on_token=lambda row, tok: seen[row].append(tok),
    )
    assert [seen[i] for i in range(3)] == tokens(out)


def test_bad_sampling_settings_are_refused():
    model = sharp_model("gqa")
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, PROMPTS, SamplingParams(top_p=0))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        generate(model, PROMPTS, SamplingParams(max_new_tokens=600))
    with pytest.raises(ConfigError, match="at least one token"):
        generate(model, [[]], SamplingParams())


def test_cache_takes_the_autocast_dtype(monkeypatch):
    """Under autocast (RL rollouts on GPUs) the KV cache is allocated in the autocast dtype, the dtype keys
    and values are computed in, so no layer re-casts the whole cache each step; greedy tokens still
    match a full forward pass under the same autocast. Without autocast it stays the model's float32."""
    import minimind.generate as generate_module

    model = sharp_model("gqa", num_layers=1)
    made, real = [], generate_module.KVCache

    def recording_cache(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(generate_module, "KVCache", recording_cache)
    params = SamplingParams(max_new_tokens=3, temperature=0)
    prompts = PROMPTS[:2]
    generate(model, prompts, params)
    assert made[-1].k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, prompts, params)
        assert made[-1].k.dtype == made[-1].v.dtype == torch.bfloat16
        for prompt, gen in zip(prompts, out.generations):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + gen.tokens])).logits[0, len(prompt) - 1 : -1].float()
            assert logits.argmax(-1).tolist() == gen.tokens
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(gen.tokens)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_a_continuation_equals_generating_from_the_whole_context(name):
    """Turn by turn with the kept KV cache (rows that stopped early, new ids of unequal lengths, a row
    dropped between turns) gives the tokens and log-probs of generating from each row's whole context
    at once: the holes it leaves are invisible and positions count real tokens only."""
    model = sharp_model(name)
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    first = tokens(generate(model, PROMPTS, greedy))
    stop = first[1][3]  # row 1 stops after 4 tokens; the others run on (or stop elsewhere)
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(stop,))
    cont = Continuation()
    out1 = generate(model, PROMPTS, p, continuation=cont)
    lengths = [len(t) for t in tokens(out1)]
    assert lengths[1] == 4 and max(lengths) == 10
    chunks = [[11, 12, 13], [40], [7, 8, 9, 10, 11, 12]]
    keys = [row_key(3, i) for i in range(3)]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)
    for drop in (False, True):
        c = Continuation()
        generate(model, PROMPTS, p, continuation=c)
        rows = [0, 2] if drop else [0, 1, 2]
        c.keep(rows)
        out2 = generate(model, [chunks[i] for i in rows], sampled, keys=[keys[i] for i in rows], continuation=c)
        whole = [PROMPTS[i] + tokens(out1)[i] + chunks[i] for i in rows]
        ref = generate(model, whole, sampled, keys=[keys[i] for i in rows])
        assert tokens(out2) == tokens(ref)
        for g, r in zip(out2.generations, ref.generations):
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-4)
        assert out2.prompt_tokens == sum(len(chunks[i]) for i in rows) + sum(lengths[i] == 10 for i in rows)
    with pytest.raises(ConfigError, match="2 prompts for a continuation of 3 rows"):
        c = Continuation()
        generate(model, PROMPTS, p, continuation=c)
        generate(model, chunks[:2], p, continuation=c)
