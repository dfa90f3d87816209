"""Next-token negative log-likelihood, summed, for exact normalisation over a global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of -log p(labels[t+1] | tokens <= t) over positions whose label is not IGNORE_INDEX.

    The standard causal-LM objective (e.g. Radford et al. 2018, eq. 1), kept as a sum so the
    caller divides by the trained-token count of the *whole* global batch: accumulated and
    distributed steps then give the same loss and gradients as one big batch.

    logits: (B, T, V); labels: (B, T) aligned with the inputs (shifted here).
    Returns (loss_sum: scalar float32, n_tokens: scalar int64).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


def group_sums(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``values``, number of entries) per group id in [0, n_groups); entries with a group of -1 are left out.

    values, groups: the same shape (e.g. (B, T-1) per-token losses and their targets' task ids).
    Returns two (n_groups,) tensors: float64 sums and int64 counts.
    """
    keep = groups >= 0
    ids = groups[keep]
    sums = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(
        0, ids, values[keep].double())
    counts = torch.bincount(ids, minlength=n_groups)
    return sums, counts
