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
