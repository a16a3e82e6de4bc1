"""Every training loss, once, with its formula. Stages pick one; the engine never knows which.

Losses return a *sum* over the tokens they cover, plus that token count: the engine divides by the
number of loss tokens in the whole optimizer step (all micro-batches, all processes), so gradient
accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimind.data.packing import IGNORE


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L = -sum_t log p(y_t | y_<t) over positions whose label is not IGNORE (-100).

    Computed in float32 whatever the autocast dtype: bf16 log-softmax over 6400 ids loses digits.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum_t log p(y_t | y_<t) over labelled positions, number of those positions).

    The sequence log-probability DPO and the RL stages compare between models; float32.
    """
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)


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
    with p^T = softmax(logits / T). Computed `chunk` positions at a time in float32, so a
    (tokens x vocab) float32 tensor of probabilities never exists for the whole sequence at once.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    keep = mask.reshape(-1).nonzero().squeeze(-1)
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, keep.numel(), chunk):
        idx = keep[start : start + chunk]
        log_s = torch.log_softmax(s[idx].float() / temperature, dim=-1)
        log_t = torch.log_softmax(t[idx].float() / temperature, dim=-1)
        a, b = (log_s, log_t) if reverse else (log_t, log_s)
        total = total + (a.exp() * (a - b)).sum()
    return total * temperature**2
