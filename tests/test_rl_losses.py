"""RL losses and the SPO value tracker against hand-computed values (the arithmetic is in the comments):
group advantages, k3, the clipped / Dr.GRPO / CISPO policy losses and their gradients, GAE, whitening,
the clipped value loss, PPO's per-token rewards, entropy, and the tracker's update, forgetting,
sampling weights and exact state round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch

from minimind.losses import (
    entropy_from_logits,
    gae,
    group_advantages,
    k3_kl,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
    zero_signal_groups,
)
from minimind.rl.spo import ValueTracker, spo_advantages

close = torch.testing.assert_close


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- advantages and KL --------------------------------------------------------------------------


def test_group_advantages_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, deviations +-0.5, Bessel std = sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(rewards, 4), torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    close(group_advantages(rewards, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert zero_signal_groups(rewards, 4) == 1
    assert zero_signal_groups(rewards, 2) == 2  # [1, 0] [0, 1] differ, [2, 2] [2, 2] do not
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_k3_values_sign_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -2.0])
    # d = ref - logp = [0, 1, -1.5]; k3 = e^d - d - 1 = [0, e - 2, e^-1.5 + 0.5]
    k = k3_kl(logp, ref)
    close(k, torch.tensor([0.0, math.e - 2, math.exp(-1.5) + 0.5]))
    k.sum().backward()
    close(logp.grad, 1 - torch.exp(torch.tensor([0.0, 1.0, -1.5])))  # d k3 / d logp = 1 - e^d
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all() and (k3_kl(a, a) == 0).all()


# ---- policy losses ------------------------------------------------------------------------------

MASK = t([1, 1, 1, 0], [1, 0, 0, 0])  # completions of 3 and 1 tokens
ADV = torch.tensor([2.0, -1.0])


def first_step(kind, **kw):
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.3, -4.0, -4.0, -4.0]], requires_grad=True)
    loss, units, stats = policy_loss(logp, logp.detach().clone(), ADV, MASK, kind=kind, **kw)
    (loss / units).backward()
    return loss / units, units, stats, logp.grad


def test_first_inner_step_ratio_is_one_and_loss_is_minus_advantage():
    loss, units, stats, grad = first_step("grpo")
    # rho = 1 exactly: L_it = -A_i; per-completion means [-2, 1], mean over the 2 completions -0.5
    assert units == 2 and stats["ratio"].item() == 1.0 and stats["clip_frac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    close(loss, torch.tensor(-0.5))
    close(grad, t([-2 / 3, -2 / 3, -2 / 3, 0], [1, 0, 0, 0]) / 2)  # -A_i / |o_i|, / 2 completions
    loss, units, stats, grad = first_step("ppo")  # token-level mean: -(3 * 2 - 1) / 4 tokens
    assert units == 4
    close(loss, torch.tensor(-1.25))
    close(grad, t([-2, -2, -2, 0], [1, 0, 0, 0]) / 4)


def test_dr_grpo_divides_by_a_constant_not_by_each_length():
    # L_it = -A_i (rho = 1): token sum = -(2 + 2 + 2) + 1 = -5
    loss, units, _, grad = first_step("dr_grpo", max_len=4)  # -5 / (B = 2 * max_len = 4)
    assert units == 2
    close(loss, torch.tensor(-5 / 8))
    close(grad, t([-2, -2, -2, 0], [1, 0, 0, 0]) / 8)  # every token weighs 1 / (B max_len)
    loss, _, _, _ = first_step("dr_grpo")  # max_len defaults to T = 4: same
    close(loss, torch.tensor(-5 / 8))
    loss, _, _, _ = first_step("dr_grpo", max_len=10)  # -5 / 20
    close(loss, torch.tensor(-0.25))
    # GRPO on the same tokens: mean of per-completion means = (-2 + 1) / 2 = -0.5 != -0.625
    close(first_step("grpo")[0], torch.tensor(-0.5))


def test_clip_engages_only_in_the_direction_that_matters():
    rho = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    adv = t([1, 1, -1, -1, 1])
    logp = torch.zeros(1, 5, requires_grad=True)
    loss, units, stats = policy_loss(logp, -rho.log(), adv, torch.ones(1, 5), kind="ppo", clip=0.2)
    loss.backward()
    # -min(rho A, clip(rho, 0.8, 1.2) A):
    #   A>0 rho 1.5: min(1.5, 1.2) = 1.2 clipped  -> -1.2, grad 0
    #   A>0 rho 0.5: min(0.5, 0.8) = 0.5 plain    -> -0.5, grad -A rho = -0.5
    #   A<0 rho 1.5: min(-1.5, -1.2) = -1.5 plain ->  1.5, grad  1.5
    #   A<0 rho 0.5: min(-0.5, -0.8) = -0.8 clipped -> 0.8, grad 0
    #   A>0 rho 1.1: inside                       -> -1.1, grad -1.1
    assert units == 5
    close(loss, torch.tensor(-1.2 - 0.5 + 1.5 + 0.8 - 1.1))
    close(logp.grad, t([0, -0.5, 1.5, 0, -1.1]))
    close(stats["clip_frac"], torch.tensor(2 / 5))
    close(stats["ratio"], torch.tensor((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5))
    # clip-higher 0.6: rho 1.5 < 1.6 is no longer clipped for A > 0 (-1.5, grad -1.5)
    logp.grad = None
    loss, _, stats = policy_loss(logp, -rho.log(), adv, torch.ones(1, 5), kind="ppo", clip=0.2, clip_high=0.6)
    loss.backward()
    close(loss, torch.tensor(-1.5 - 0.5 + 1.5 + 0.8 - 1.1))
    close(logp.grad, t([-1.5, -0.5, 1.5, 0, -1.1]))
    close(stats["clip_frac"], torch.tensor(1 / 5))


def test_grpo_gradient_and_kl_penalty_by_hand_on_two_tokens():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, ref = t([-1.1, -1.9]), t([-1.0, -1.5])
    loss, units, stats = policy_loss(logp, old, torch.tensor([1.5]), torch.ones(1, 2), ref_logp=ref, beta=0.1)
    loss.backward()
    r0, r1 = math.exp(0.1), math.exp(-0.1)  # inside [0.8, 1.2]: the unclipped branch
    k1 = math.exp(0.5) - 0.5 - 1  # d = ref - logp = [0, 0.5]
    # L = (-1.5 r0 - 1.5 r1 + 0.1 (0 + k1)) / 2 tokens, one completion
    assert units == 1
    close(loss, torch.tensor((-1.5 * (r0 + r1) + 0.1 * k1) / 2))
    # dL/dlogp_t = (-A rho_t + beta (1 - e^{d_t})) / 2
    close(logp.grad, torch.tensor([[-1.5 * r0 / 2, (-1.5 * r1 + 0.1 * (1 - math.exp(0.5))) / 2]]))
    close(stats["kl_ref"], torch.tensor(k1 / 2))
    close(stats["approx_kl"], torch.tensor((r0 - 1 - 0.1 + r1 - 1 + 0.1) / 2))  # mean of rho - 1 - log rho


def test_cispo_gradient_is_clipped_weight_times_advantage_times_grad_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = t([-1.5, -1.9])  # rho = [e^0.5 = 1.649 -> clipped to 1.2, e^-0.1 = 0.905]
    loss, units, stats = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2), kind="cispo")
    loss.backward()
    w = torch.tensor([[1.2, math.exp(-0.1)]])
    # objective sum_t sg(w_t) A logp_t: its gradient is w_t A grad(logp_t); the loss is its negative
    assert units == 2
    close(logp.grad, -w * 2.0)
    close(loss, -(w * 2.0 * logp.detach()).sum())
    close(stats["clip_frac"], torch.tensor(0.5))
    # the clipped-surrogate loss gives the clipped token no gradient at all; CISPO keeps it
    logp.grad = None
    policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2), kind="ppo")[0].backward()
    close(logp.grad, torch.tensor([[0.0, -2.0 * math.exp(-0.1)]]))


def test_policy_loss_ignores_padding_even_when_infinite():
    logp = torch.tensor([[-1.0, -math.inf]], requires_grad=True)
    for kind in ("grpo", "dr_grpo", "ppo", "cispo"):
        logp.grad = None
        loss, _, stats = policy_loss(logp, t([-1.0, 0.0]), torch.tensor([1.0]), t([1, 0]), kind=kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
        assert all(torch.isfinite(v) for v in stats.values())
    with pytest.raises(ValueError, match="unknown policy loss"):
        policy_loss(logp, logp, torch.ones(1), t([1, 0]), kind="reinforce")


# ---- PPO pieces ---------------------------------------------------------------------------------


def test_gae_by_hand_with_masked_tail_and_shifted_start():
    g, lam = 0.9, 0.8
    # row 0: real tokens 0..2, tail masked (its reward 5 and value 9 must be ignored)
    #   t2: delta = 1 + 0.9 * 0 - 0.7 = 0.3                     A2 = 0.3   (nothing bootstrapped past the end)
    #   t1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03                  A1 = 0.03 + 0.72 * 0.3 = 0.246
    #   t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04                  A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # row 1: the same episode starting at column 1 (column 0 masked, reward 7 and value 9 ignored)
    rewards, values = t([0, 0, 1, 5], [7, 0, 0, 1]), t([0.5, 0.6, 0.7, 9], [9, 0.5, 0.6, 0.7])
    adv, ret = gae(rewards, values, t([1, 1, 1, 0], [0, 1, 1, 1]), gamma=g, lam=lam)
    close(adv, t([0.21712, 0.246, 0.3, 0], [0, 0.21712, 0.246, 0.3]))
    close(ret, t([0.71712, 0.846, 1.0, 0], [0, 0.71712, 0.846, 1.0]))  # R = A + V


def test_whiten():
    x, mask = t([1, 3, 5, 100]), t([1, 1, 1, 0])
    # mean 3, Bessel var (4 + 0 + 4) / 2 = 4, std 2
    close(whiten(x, mask), t([-1, 0, 1, 0]), atol=1e-6, rtol=0)
    close(whiten(x, mask, shift_mean=False), t([2, 3, 4, 0]), atol=1e-6, rtol=0)
    # Over processes (`reduce` sums each statistic): a second process holding the same tokens doubles
    # every sum, which is whitening the two copies together: 6 tokens, var (4 + 0 + 4) * 2 / 5 = 3.2.
    both = whiten(torch.cat([x, x], -1), torch.cat([mask, mask], -1))[..., :4]
    close(whiten(x, mask, reduce=lambda v: 2 * v), both, atol=1e-6, rtol=0)
    close(both, t([-2 / 3.2**0.5, 0, 2 / 3.2**0.5, 0]), atol=1e-6, rtol=0)


def test_value_loss_clip():
    values = torch.tensor([[1.0, 0.0, 3.0]], requires_grad=True)
    old, returns, mask = t([0.5, 0.5, 0.0]), t([2.0, 1.0, 0.0]), t([1, 1, 0])
    loss, clip_frac = value_loss(values, old, returns, mask, clip=0.2)
    loss.backward()
    # t0: V_c = 0.5 + 0.2 = 0.7; (1 - 2)^2 = 1 < (0.7 - 2)^2 = 1.69 -> 0.845 (clipped, no gradient)
    # t1: V_c = 0.5 - 0.2 = 0.3; (0 - 1)^2 = 1 > (0.3 - 1)^2 = 0.49 -> 0.5   (plain, grad V - R = -1)
    close(loss, torch.tensor(0.845 + 0.5))
    close(clip_frac, torch.tensor(0.5))
    close(values.grad, t([0.0, -1.0, 0.0]))


def test_token_rewards_puts_the_score_on_each_rows_last_real_token():
    mask = t([1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0])
    logp, ref = torch.full((4, 4), -1.0), torch.full((4, 4), -1.5)  # logp - ref = 0.5 -> -0.1 * 0.5 = -0.05
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), logp, ref, mask, kl_coef=0.1)
    close(r, t([-0.05, -0.05, 0.95, 0], [1.95, 0, 0, 0], [0, -0.05, -0.05, 2.95], [0, 0, 0, 0]))


def test_entropy_masked_mean():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -100.0, -100.0], [1000.0, 0.0, 0.0, 0.0]]])
    # position 0: uniform over 4 -> ln 4; position 1: p = [1/4, 3/4] -> -(0.25 ln 0.25 + 0.75 ln 0.75); 2 masked
    h = (math.log(4) - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))) / 2
    for chunk in (1, 256):
        close(entropy_from_logits(logits, t([1, 1, 0]).unsqueeze(0), chunk=chunk), torch.tensor(h))


# ---- SPO ----------------------------------------------------------------------------------------


def test_tracker_baseline_moves_toward_rewards_and_forgets_faster_with_larger_kl():
    tr = ValueTracker()  # prior Beta(1, 1), D_half 0.06, rho in [0.875, 0.96]
    close(tr.values([0, 1]), torch.tensor([0.5, 0.5]))
    # rho = clip(2^(-D / 0.06)): D = 0 -> 1 -> 0.96; D = 0.005 -> 2^(-1/12) = 0.943874; D = 1 -> 0.875
    assert tr.discount(0.0) == 0.96 and tr.discount(1.0) == 0.875
    assert tr.discount(0.005) == pytest.approx(2 ** (-1 / 12))
    tr.update([0], [1.0])  # alpha = 0.96 + 1 = 1.96, beta = 0.96 -> 1.96 / 2.92
    close(tr.values([0]), torch.tensor([1.96 / 2.92]))
    tr.update([0, 1], [1.0, 1.0])
    tr.update([0, 1], [1.0, 1.0])
    tr.update([1], [1.0])
    # both saw three 1s with rho 0.96: alpha = 3.766336, beta = 0.884736; now a 0 with D = 0 vs D = 1
    tr.update([0, 1], [0.0, 0.0], kl=torch.tensor([0.0, 1.0]))
    v0 = 0.96 * 3.766336 / (0.96 * 3.766336 + 0.96 * 0.884736 + 1)  # 0.661604
    v1 = 0.875 * 3.766336 / (0.875 * 3.766336 + 0.875 * 0.884736 + 1)  # 0.650049: old 1s faded more
    close(tr.values([0, 1]), torch.tensor([v0, v1]))
    assert v1 < v0
    # a prompt seen twice in one batch is discounted once: 0.96 (1, 1) + (1, 0) + (0, 1) -> mean 0.5
    tr.update([7, 7], [1.0, 0.0])
    assert tr.counts[7] == [0.96 + 1, 0.96 + 1]
    # rewards outside [0, 1]: the rho-discounted average, (0.96 * 1 + 10) / (0.96 * 2 + 1)
    tr.update([8], [10.0])
    close(tr.values([8]), torch.tensor([10.96 / 2.92]))


def test_spo_advantages_normalise_over_the_batch():
    # A = r - b = [0.5, -0.5, 0.1, -0.1]; mean 0; Bessel std = sqrt(0.52 / 3) = 0.416333
    a = spo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.5, 0.5, 0.9, 0.1]))
    close(a, torch.tensor([0.5, -0.5, 0.1, -0.1]) / (math.sqrt(0.52 / 3) + 1e-6))
    close(spo_advantages(torch.tensor([1.0]), torch.tensor([0.2])), torch.tensor([0.0]))


def test_tracker_priority_weights_peak_at_one_half():
    tr = ValueTracker()
    tr.update([1], [1.0])  # v = 1.96 / 2.92 = 0.671233
    tr.update([2, 2, 2, 2], [0.0, 0.0, 0.0, 0.0])  # one discount: (0.96, 0.96 + 4), v = 0.96 / 5.92
    w = tr.weights([0, 1, 2])  # prompt 0 never seen: v = 0.5
    v1, v2 = 1.96 / 2.92, 0.96 / 5.92
    close(w, torch.tensor([0.5 + 0.05, math.sqrt(v1 * (1 - v1)) + 0.05, math.sqrt(v2 * (1 - v2)) + 0.05]))
    assert w.argmax() == 0 and w[1] > w[2]


def test_tracker_state_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    tr = ValueTracker(prior=0.3, prior_strength=4.0, d_half=0.1)
    for _ in range(5):
        ids = torch.randint(0, 20, (8,), generator=g)
        tr.update(ids, torch.randint(0, 2, (8,), generator=g).float(), kl=torch.rand(8, generator=g) * 0.2)
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)
    buf.seek(0)
    back = ValueTracker()
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert back.counts == tr.counts and (back.prior, back.prior_strength, back.d_half) == (0.3, 4.0, 0.1)
    for x in (tr, back):  # and they keep going identically, new prompts starting from the same prior
        x.update([3, 99], [1.0, 0.0], kl=0.05)
    assert back.counts == tr.counts
    assert torch.equal(back.values(range(100)), tr.values(range(100)))
