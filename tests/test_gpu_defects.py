"""Issue 16 defects that bite on a GPU, shown on the CPU: rollout rows never padded past the RoPE
table, reward models scoring on the trainer's device, and the sync-free KD / entropy / policy-loss
formulas equal to their earlier (host-syncing) implementations in value and gradient."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import sharp_model, tiny_config

from minimind.checkpoint import save_run
from minimind.data.batch import IGNORE
from minimind.data.prompts import Prompt
from minimind.generate import SamplingParams, generate
from minimind.losses import entropy_from_logits, kd_kl_sum, policy_loss, token_logps
from minimind.model import MiniMind
from minimind.reward_model import RewardModel
from minimind.rl import rewards
from minimind.rl.rewards import parse_reward
from minimind.rl.rollout import PolicyLoss, RLOptions, RolloutSource, completion_rows
from minimind.sources import Runtime

# ---- rollout rows and the RoPE table --------------------------------------------------------------


class NoStops:
    """The session tokenizer without stop ids: every completion runs to max_new_tokens."""

    stop_ids: tuple[int, ...] = ()

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def fake_trainer(model, tok, device="cpu", batch_size=2):
    """The run as a rollout source sees it, without a trainer."""
    cfg = SimpleNamespace(seed=0, batch_size=batch_size, accumulation=1)
    return Runtime(cfg, tok, torch.device(device), torch.float32, 0, 1, model, model, lambda: model)


def test_completion_rows_never_pad_past_the_position_table():
    """max_position_embeddings 61: a prompt + completion of 61 tokens is a row of 60 inputs; padding
    it to 64 (the next multiple of 8) indexed past the RoPE table (IndexError here, a device-side
    assert on CUDA). Capped at 61 it runs, and its log-probs are those of the row alone."""
    model = sharp_model(max_position_embeddings=61)
    prompts = [list(range(3, 52)), [7, 8, 9]]  # 49 and 3 prompt tokens
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), seed=0)
    completions = [g.tokens for g in generate(model, prompts, params).generations]
    assert [len(p + c) for p, c in zip(prompts, completions)] == [61, 15]
    uncapped, _ = completion_rows(prompts, completions, pad_id=0)
    assert uncapped.shape[1] == 64
    with pytest.raises(IndexError):
        model(uncapped)
    inputs, labels = completion_rows(prompts, completions, pad_id=0, max_positions=61)
    assert inputs.shape[1] == 61
    with torch.no_grad():
        batched = token_logps(model(inputs).logits, labels, 1.0)
        alone = token_logps(model(inputs[:1, :60]).logits, labels[:1, :60], 1.0)
    torch.testing.assert_close(batched[:1, :60], alone, atol=1e-5, rtol=1e-5)
    assert int((labels[0] != IGNORE).sum()) == 12
    with pytest.raises(ValueError, match="exceeds 61 positions"):
        completion_rows([list(range(3, 52))], [list(range(14))], pad_id=0, max_positions=61)


def test_a_rollout_that_reaches_max_position_embeddings_trains(tokenizer):
    """The whole rollout path: prompts of 49 tokens + 12 new ones fill a 61-position model exactly."""
    model = sharp_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=61)
    tok = NoStops(tokenizer)
    opts = RLOptions(reward="rule:repetition", num_generations=2, max_new_tokens=12, beta=0.0)
    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], None, f"p.jsonl:{i}") for i in range(2)]
    ids = [list(range(10, 59)), list(range(100, 149))]

    def advantages(r, each):
        return r - r.mean(), {}

    source = RolloutSource(fake_trainer(model, tok), prompts, ids, parse_reward(opts.reward), opts, advantages, None)
    (batch,) = source.rollout()
    assert batch.input_ids.shape == (4, 61) and int((batch.labels != IGNORE).sum()) == 4 * 12
    loss, _, _ = PolicyLoss(opts)(model.train(), batch)
    assert torch.isfinite(loss)


# ---- reward models on the trainer's device ----------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    model = RewardModel.from_backbone(MiniMind(tiny_config(vocab_size=tokenizer.vocab_size)))
    save_run(out, model.eval(), tokenizer, {"stage": "reward"})
    return out


def rm_device(fn) -> torch.device:
    (term,) = fn.terms
    model, _ = term.component.model()
    return next(model.parameters()).device


def test_reward_models_load_on_the_device_they_are_bound_to(rm_dir, tokenizer):
    rewards.load_rm.cache_clear()
    assert rm_device(parse_reward(f"rm:{rm_dir}")).type == "cpu"  # the default
    assert rm_device(parse_reward(f"rm:{rm_dir}", device="meta")).type == "meta"
    assert rm_device(parse_reward(f"rm:{rm_dir}").to(torch.device("meta"))).type == "meta"
    fn = parse_reward(f"rm:{rm_dir} + rule:format").to("cpu")  # rules are untouched; scores still come
    out = fn([Prompt([{"role": "user", "content": "2 + 3?"}], None, "p:1")], ["5.", "six"])
    assert out.total.shape == (2,) and torch.isfinite(out.total).all()
    # The RL stages: RolloutSource binds the reward to the trainer's device.
    opts = RLOptions(reward=f"rm:{rm_dir}", num_generations=2)
    trainer = fake_trainer(sharp_model(vocab_size=tokenizer.vocab_size), tokenizer, device="meta")
    prompts = [Prompt([{"role": "user", "content": "2 + 3?"}], None, "p:1")]
    source = RolloutSource(trainer, prompts, [[5]], parse_reward(opts.reward), opts, lambda r, e: (r, {}), None)
    assert rm_device(source.reward).type == "meta"


# ---- sync-free formulas == their earlier implementations -------------------------------------------


def old_kd_kl_sum(s, t, mask, T, reverse):
    """The earlier kd_kl_sum: only the positions `mask.nonzero()` lists (a host sync), plain autograd."""
    keep = mask.reshape(-1).nonzero().squeeze(-1)
    log_s = torch.log_softmax(s.reshape(-1, s.shape[-1])[keep].float() / T, -1)
    log_t = torch.log_softmax(t.reshape(-1, t.shape[-1])[keep].float() / T, -1)
    a, b = (log_s, log_t) if reverse else (log_t, log_s)
    return (a.exp() * (a - b)).sum() * T**2


def old_entropy(logits, mask):
    z = logits.reshape(-1, logits.shape[-1])
    keep = mask.reshape(-1).nonzero().squeeze(-1)
    logp = torch.log_softmax(z[keep].float(), -1)
    return -(logp.exp() * logp).sum() / max(keep.numel(), 1)


@pytest.mark.parametrize("reverse", [False, True])
def test_kd_kl_without_nonzero_equals_the_earlier_values_and_gradients(reverse):
    """Off-mask positions are computed now, but add exactly 0 and get exactly 0 gradient, even when
    their logits are not finite; on the mask, value and gradient are the earlier ones."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 13, 40, generator=g) * 3, torch.randn(3, 13, 40, generator=g) * 3
    for mask in (torch.rand(3, 13, generator=g) > 0.5, (torch.rand(3, 13, generator=g) > 0.3).float()):
        junk_s, junk_t = s.clone(), t.clone()
        junk_s[mask == 0] = float("nan")
        junk_t[mask == 0] = float("-inf")
        for T in (1.0, 2.0):
            old_x = s.clone().requires_grad_()
            old = old_kd_kl_sum(old_x, t, mask, T, reverse)
            old.backward()
            for chunk in (1, 5, 256):
                x = junk_s.clone().requires_grad_()
                new = kd_kl_sum(x, junk_t, mask, T, reverse, chunk)
                new.backward()
                torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(x.grad[mask != 0], old_x.grad[mask != 0], rtol=1e-5, atol=1e-6)
                assert (x.grad[mask == 0] == 0).all()
    empty = torch.zeros(3, 13, dtype=torch.bool)
    x = s.clone().requires_grad_()
    kd_kl_sum(x, t, empty, 1.0, reverse).backward()
    assert (x.grad == 0).all()


def test_entropy_without_nonzero_equals_the_earlier_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, 30, generator=g) * 2
    mask = torch.rand(4, 9, generator=g) > 0.4
    for chunk in (1, 7, 256):
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        old, new = old_entropy(a, mask), entropy_from_logits(b, mask, chunk=chunk)
        old.backward(), new.backward()
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    assert entropy_from_logits(logits, torch.zeros(4, 9, dtype=torch.bool)) == 0


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
def test_token_level_units_are_a_tensor_equal_to_the_token_count(kind):
    """ppo / cispo divide by the batch's tokens: a 0-d tensor now (no int() sync), the same count."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    logp = (torch.randn(3, 4, generator=g) - 2).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(3, 4, generator=g)
    loss, units, stats = policy_loss(logp, old, torch.tensor([1.0, -0.5, 2.0]), mask, kind=kind)
    assert isinstance(units, torch.Tensor) and units.dim() == 0 and int(units) == 8
    (loss / units).backward()
    grad = logp.grad.clone()
    logp.grad = None
    loss2, _, _ = policy_loss(logp, old, torch.tensor([1.0, -0.5, 2.0]), mask, kind=kind)
    (loss2 / 8).backward()  # the earlier int units
    torch.testing.assert_close(loss / units, loss2 / 8)
    torch.testing.assert_close(grad, logp.grad)


# ---- on a GPU only ---------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_training_step_losses_never_wait_for_the_gpu():
    """torch's sync debug mode raises on any host-device synchronisation (nonzero, item, int())."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(2, 50, 64, device="cuda", generator=g).requires_grad_()
    t = torch.randn(2, 50, 64, device="cuda", generator=g)
    mask = torch.rand(2, 50, device="cuda", generator=g) > 0.3
    logp = (torch.randn(2, 50, device="cuda", generator=g) - 2).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kd_kl_sum(s, t, mask, 2.0, False, chunk=16).backward()
        kd_kl_sum(s, t, mask, 1.0, True, chunk=16).backward()
        entropy_from_logits(s.detach(), mask, chunk=16)
        for kind in ("grpo", "dr_grpo", "ppo", "cispo"):
            loss, units, _ = policy_loss(logp, logp.detach() + 0.1, torch.ones(2, device="cuda"), mask, kind=kind)
            (loss / units).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
def test_rollout_rows_fill_the_position_table_on_cuda():
    model = sharp_model(max_position_embeddings=61).cuda()
    inputs, labels = completion_rows([list(range(3, 52))], [list(range(12))], pad_id=0, max_positions=61)
    with torch.no_grad():
        out = token_logps(model(inputs.cuda()).logits, labels.cuda(), 1.0)
    torch.cuda.synchronize()  # a RoPE index past the table would be a device-side assert here
    assert torch.isfinite(out).all()


@cuda
def test_reward_model_scores_on_cuda_as_on_the_cpu(rm_dir):
    prompts = [Prompt([{"role": "user", "content": "2 + 3?"}], None, "p:1")]
    on_cpu = parse_reward(f"rm:{rm_dir}")(prompts, ["5.", "six"])
    fn = parse_reward(f"rm:{rm_dir}").to("cuda")
    assert rm_device(fn).type == "cuda"
    torch.testing.assert_close(fn(prompts, ["5.", "six"]).total, on_cpu.total, atol=1e-4, rtol=1e-4)
