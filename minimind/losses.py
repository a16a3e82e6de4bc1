"""Every training loss, once, with its formula. Stages pick one; the engine never knows which.

Losses return a *sum* over the tokens they cover, plus that token count: the engine divides by the
number of loss tokens in the whole optimizer step (all micro-batches, all processes), so gradient
accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from minimind.data.batch import IGNORE


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L = -sum_t log p(y_t | y_<t) over positions whose label is not IGNORE (-100).

    Computed in float32 whatever the autocast dtype: bf16 log-softmax over 6400 ids loses digits.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log p(y_t) of each label under softmax(logits_t / T), float32; 0 where the label is IGNORE.

        log p(y) = z_y - logsumexp(z),   z = logits / T

    The one per-token log-prob (DPO, RL ratios and KLs, evaluation): the label's logit minus the
    log-normaliser, so no (B, T, V) log-softmax tensor is made beside the float32 logits.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - z.logsumexp(-1)).masked_fill(labels == IGNORE, 0.0)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum_t log p(y_t | y_<t) over labelled positions, number of those positions): the
    sequence log-probability DPO compares between models; float32."""
    return token_logps(logits, labels).sum(-1), (labels != IGNORE).sum(-1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on sequence log-probs (policy and frozen reference), per pair.

        h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
        sigmoid (DPO, Rafailov et al. 2023):  L = -log sigma(beta h)
        ipo (Azar et al. 2023):               L = (h - 1 / (2 beta))^2
    IPO's log-probs are means over each completion's tokens (as in its paper and TRL; the DPO stage
    divides by the lengths), so its target 1 / (2 beta) has the same scale for every pair.
    Returns (loss per pair, chosen reward beta (log pi(y_w) - log pi_ref(y_w)), rejected reward).
    """
    chosen_reward, rejected_reward = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_reward - rejected_reward
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r} (sigmoid or ipo)")
    return loss, beta * chosen_reward.detach(), beta * rejected_reward.detach()


def bradley_terry_loss(chosen_score: torch.Tensor, rejected_score: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: L = -log sigma(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(chosen_score.float() - rejected_score.float())


def weighted_token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = -sum_t w_t log p(y_t | y_<t) over labelled positions (divide by sum_t w_t to normalise).

    Reasoning distillation weights the think/answer tag positions (e.g. w = 10 there, 1 elsewhere).
    """
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return (ce * weights.reshape(-1).float()).sum()


def kd_kl_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    reverse: bool = False,
    chunk: int = 256,
) -> torch.Tensor:
    """Knowledge-distillation term summed over masked positions, scaled by T^2 (Hinton et al. 2015):

        forward:  T^2 * KL(p_teacher^T || p_student^T) = T^2 sum_v p_t (log p_t - log p_s)
        reverse:  T^2 * KL(p_student^T || p_teacher^T)
    with p^T = softmax(logits / T). Computed `chunk` positions at a time in float32, in the forward
    *and* the backward pass (a custom autograd function recomputes each chunk from the logits and
    writes its gradient, d/dz_s = T (p_s - p_t) forward, T p_s (log p_s - log p_t - KL) reverse), so
    no (tokens x vocab) float32 tensor of probabilities is ever kept for the whole sequence. The
    teacher's logits get no gradient.

    Chunks run over *all* positions and the mask selects (positions off it add 0 and get a 0
    gradient, whatever their logits): a list of the masked positions would have a data-dependent
    length, and asking for it (`nonzero`) makes the host wait for the GPU in every training step.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    keep = mask.reshape(-1) != 0
    return _ChunkedKL.apply(s, t, keep, float(temperature), bool(reverse), int(chunk))


def _chunked_log_softmax(z: torch.Tensor, temperature: float, chunk: int):
    """(start, stop, log_softmax(z[start:stop] / T) in float32) over every `chunk` rows of z."""
    for start in range(0, z.shape[0], chunk):
        yield start, start + chunk, torch.log_softmax(z[start : start + chunk].float() / temperature, dim=-1)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def _chunks(s, t, temperature, chunk):
        for (start, stop, log_s), (_, _, log_t) in zip(
            _chunked_log_softmax(s, temperature, chunk), _chunked_log_softmax(t, temperature, chunk)
        ):
            yield start, stop, log_s, log_t

    @staticmethod
    def forward(ctx, s, t, keep, temperature, reverse, chunk):  # type: ignore[override]
        ctx.save_for_backward(s, t, keep)
        ctx.temperature, ctx.reverse, ctx.chunk = temperature, reverse, chunk
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for start, stop, log_s, log_t in _ChunkedKL._chunks(s, t, temperature, chunk):
            a, b = (log_s, log_t) if reverse else (log_t, log_s)
            total = total + torch.where(keep[start:stop], (a.exp() * (a - b)).sum(-1), 0.0).sum()
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        s, t, keep = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.empty_like(s)
        for start, stop, log_s, log_t in _ChunkedKL._chunks(s, t, T, ctx.chunk):
            p_s = log_s.exp()
            if ctx.reverse:
                d = log_s - log_t
                g = p_s * (d - (p_s * d).sum(-1, keepdim=True))
            else:
                g = p_s - log_t.exp()
            grad[start:stop] = torch.where(keep[start:stop, None], grad_out * T * g, 0.0).to(grad.dtype)
        return grad, None, None, None, None, None


# ---- reinforcement learning ----
#
# Tensors of the RL stages: (B, T) per-token values for the completion tokens only, and a `mask`
# (B, T), float or bool, that is 1 on real completion tokens (up to and including the first EOS) and
# 0 elsewhere. Real tokens need not start at column 0: every function finds them through the mask.
# All arithmetic is float32 whatever the autocast dtype.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x m) / max(sum(m), 1): the mean of x over the tokens the mask keeps (0 when it keeps none)."""
    keep = mask != 0
    return torch.where(keep, x.float(), 0.0).sum() / keep.sum().clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantage of each of the G completions sampled for one prompt, (B,) -> (B,).

        GRPO (Shao et al. 2024):     A_i = (r_i - mean_G(r)) / (std_G(r) + eps)
        Dr.GRPO (Liu et al. 2025):   A_i =  r_i - mean_G(r)                      (scale=False)
    Rows are grouped consecutively: rows [kG, (k+1)G) answer prompt k. std is the Bessel-corrected
    sample std (as upstream MiniMind and TRL). A group whose rewards are all equal gets A = 0 for
    every row: it carries no learning signal (count them with `zero_signal_groups`).
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size} (need >= 2 each)")
    r = rewards.detach().float().reshape(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + eps)
    return a.reshape(-1)


def zero_signal_groups(rewards: torch.Tensor, group_size: int) -> int:
    """How many groups have all rewards equal (all right or all wrong): their advantages are all 0."""
    r = rewards.detach().reshape(-1, group_size)
    return int((r.amax(dim=1) == r.amin(dim=1)).sum())


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020):

        d = log pi_ref(y_t) - log pi(y_t),   k3 = exp(d) - d - 1  >= 0,  = 0 iff d = 0
    Unbiased (E_pi[exp(d)] = 1) and never negative, unlike the naive -d. Written as expm1(d) - d so
    that small d keeps its digits. The gradient flows through `logp` (d k3 / d logp = 1 - exp(d)).
    """
    d = ref_logp.float() - logp.float()
    return torch.expm1(d) - d


POLICY_LOSSES = ("grpo", "dr_grpo", "ppo", "cispo")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "grpo",
    clip: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    max_len: int | None = None,
) -> tuple[torch.Tensor, int | torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss on completion tokens. Returns (loss sum, units, stats); loss = sum / units.

    logp: log pi_theta(y_t) with gradient; old_logp: log pi_old(y_t) of the policy that sampled the
    rollouts (no gradient); advantages: (B,) per completion or (B, T) per token. With
    rho_t = exp(logp_t - old_logp_t) (exactly 1 on the first step after sampling, logp == old_logp):

        clipped (grpo, dr_grpo, ppo; Schulman et al. 2017):
            L_t = -min(rho_t A_t, clip(rho_t, 1 - clip, 1 + clip_high) A_t) + beta k3_t
        cispo (MiniMax-M1, 2025): the clipped ratio is a detached weight, the gradient flows through logp:
            L_t = -sg(clip(rho_t, 1 - clip, 1 + clip_high)) A_t logp_t + beta k3_t
    k3_t = k3_kl(logp, ref_logp) when `ref_logp` is given and beta > 0. clip_high defaults to `clip`
    (DAPO's clip-higher sets it larger; MiniMax-M1 uses a large `clip` to drop the lower bound).

    Aggregation, and so what the loss sum holds and the caller divides by (the engine divides by the
    units of the whole optimizer step, so accumulation gives the gradient of one big batch):
        grpo:     each completion's mean over its own tokens, summed over completions;
                  units = B completions -> loss = mean_i (1/|o_i|) sum_t L_it.
        dr_grpo:  sum_t L_it / max_len summed over completions, units = B -> loss = sum_it L_it / (B max_len).
                  No division by each completion's length: a long wrong answer is not diluted. `max_len`
                  must be the same constant for every micro-batch (the generation budget,
                  max_new_tokens); it defaults to T, which is only constant if rows are padded to it.
        ppo, cispo: sum over all tokens, units = tokens -> loss = sum_it L_it / sum_i |o_i|
                  (token-level mean over the whole batch, as PPO/DAPO and MiniMax-M1 do). These
                  units are a 0-d tensor on the mask's device (the others a Python int).

    stats (detached float32 scalars, masked means over tokens):
        clip_frac:  share of tokens where clipping changed the objective: clipped kinds pick the
                    clipped branch only when A > 0 and rho > 1 + clip_high, or A < 0 and rho < 1 - clip
                    (there its gradient is 0); cispo: share of tokens whose weight was clipped.
        ratio:      mean rho.    approx_kl: mean (rho - 1) - log rho, the k3 estimate of KL(pi_old || pi).
        kl_ref:     mean k3 to the reference (only when ref_logp is given).
    """
    if kind not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {kind!r} (one of {', '.join(POLICY_LOSSES)})")
    clip_high = clip if clip_high is None else clip_high
    keep = mask != 0
    m = keep.float()
    # Padding positions are set to 0 before any arithmetic: a -inf there would turn 0 * inf into NaN.
    logp = logp.float().masked_fill(~keep, 0.0)
    adv = advantages.detach().float()
    adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).masked_fill(~keep, 0.0)
    log_ratio = logp - old_logp.detach().float().masked_fill(~keep, 0.0)
    rho = torch.exp(log_ratio)
    rho_clipped = rho.clamp(1 - clip, 1 + clip_high)
    if kind == "cispo":
        per_token = -rho_clipped.detach() * adv * logp
        clipped = rho_clipped != rho
    else:
        per_token = -torch.min(rho * adv, rho_clipped * adv)
        clipped = ((adv > 0) & (rho > 1 + clip_high)) | ((adv < 0) & (rho < 1 - clip))
    stats = {}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.float().masked_fill(~keep, 0.0))
        if beta:
            per_token = per_token + beta * kl
        stats["kl_ref"] = masked_mean(kl.detach(), m)
    per_token = per_token * m
    if kind == "grpo":
        loss, units = (per_token.sum(-1) / m.sum(-1).clamp(min=1)).sum(), m.shape[0]
    elif kind == "dr_grpo":
        loss, units = per_token.sum() / (max_len or m.shape[-1]), m.shape[0]
    else:  # units stay a tensor: int() here would make the host wait for the device every step
        loss, units = per_token.sum(), m.sum()
    rho = rho.detach()
    stats["clip_frac"] = masked_mean(clipped.float(), m)
    stats["ratio"] = masked_mean(rho, m)
    stats["approx_kl"] = masked_mean(rho - 1 - log_ratio.detach(), m)
    return loss, units, stats


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's real tokens (Schulman et al. 2016): (A, returns).

        delta_t = r_t + gamma V_{t'} - V_t,     A_t = delta_t + gamma lam A_{t'},     R_t = A_t + V_t
    where t' is the row's next *real* token (masked positions are skipped, not treated as steps), and
    after the last real token V_{t'} = A_{t'} = 0: the episode ends there, nothing is bootstrapped
    from values at padding. Outputs are 0 off the mask and carry no gradient.
    """
    m = mask.float()
    r, v = rewards.detach().float() * m, values.detach().float() * m
    adv = torch.zeros_like(r)
    next_v, next_a = torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        keep = m[:, t] > 0
        adv[:, t] = torch.where(keep, a, 0.0)
        next_a, next_v = torch.where(keep, a, next_a), torch.where(keep, v[:, t], next_v)
    return adv, (adv + v) * m


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and Bessel-corrected var over the masked tokens; 0 off the mask.

    shift_mean=False adds the mean back (only rescales): whitening rewards must not change their sign.
    `reduce` sums a tensor over processes (an all-reduce): the mean and the variance are then those of
    the tokens of every process, the global batch (two passes, as on one process).
    """
    total = reduce or (lambda v: v)
    m = mask.float()
    x = x.detach().float()
    keep = m != 0
    kept, summed, weight = total(torch.stack([keep.sum().float(), torch.where(keep, x, 0.0).sum(), m.sum()])).unbind()
    mean = summed / kept.clamp(min=1)  # masked_mean, over every process
    var = total((((x - mean) * m) ** 2).sum()) / (weight - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO as in OpenAI baselines), summed over masked tokens; divide by their count.

        V_c = old_V + clip(V - old_V, -clip, clip),     L_t = 0.5 max((V_t - R_t)^2, (V_c,t - R_t)^2)
    Returns (sum_t L_t, share of tokens where the clipped term was the larger one).
    """
    m = mask.float()
    v, old, ret = values.float(), old_values.detach().float(), returns.detach().float()
    v_clipped = old + (v - old).clamp(-clip, clip)
    loss_plain, loss_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * torch.max(loss_plain, loss_clipped)
    return (loss * m).sum(), masked_mean((loss_clipped > loss_plain).float(), m)


def token_rewards(
    score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """PPO's per-token reward (Ziegler et al. 2019): a KL penalty on every token, the score at the end.

        r_t = -kl_coef (logp_t - ref_logp_t) + [t = last real token of the row] score
    The last real token is found from the mask, row by row (the highest column where mask = 1), so
    rows of any length, and real tokens not starting at column 0, get their score in the right place.
    Rows without real tokens get nothing. 0 off the mask; no gradient.
    """
    m = mask.float()
    r = -kl_coef * (logp.detach().float() - ref_logp.detach().float()) * m
    T = m.shape[1]
    last = T - 1 - (m.flip(-1) > 0).int().argmax(-1)  # argmax finds the first 1 from the right
    has_tokens = m.sum(-1) > 0
    rows = torch.arange(m.shape[0], device=m.device)
    r[rows, last] += torch.where(has_tokens, score.detach().float(), 0.0)
    return r


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean entropy of the next-token distribution over masked positions:

        H_t = -sum_v p_v log p_v,  p = softmax(logits_t);   returns sum_t m_t H_t / sum_t m_t
    Computed `chunk` positions at a time in float32, so a (tokens x vocab) float32 tensor never
    exists for the whole batch; positions off the mask are computed too and add 0 (no
    data-dependent shapes, so no host-device sync). Differentiable (usable as an entropy bonus).
    """
    z = logits.reshape(-1, logits.shape[-1])
    keep = mask.reshape(-1) != 0
    total = z.new_zeros((), dtype=torch.float32)
    for start, stop, logp in _chunked_log_softmax(z, 1.0, chunk):
        total = total - torch.where(keep[start:stop], (logp.exp() * logp).sum(-1), 0.0).sum()
    return total / keep.sum().clamp(min=1)
