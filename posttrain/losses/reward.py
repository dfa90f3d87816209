"""Pairwise reward-model loss (Bradley-Terry), with optional margin and reward centering."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    center_weight: float = 0.0,
) -> torch.Tensor:
    """-log σ(r_c - r_r - m) + center_weight · (r_c + r_r)², per pair.

    The Bradley-Terry reward-model loss of Ouyang et al. 2022, eq. 1; the margin m is Llama 2's
    (Touvron et al. 2023, §3.2.2), larger for pairs the annotators rated as clearly separated.
    A NaN margin means "no margin for this pair" (datasets mixing rated and unrated pairs) and
    counts as 0. The centering term is Eisenstein et al. 2023's: the loss only sees reward
    differences, so it pins the free offset near 0 to keep rewards comparable across prompts.

    r_chosen, r_rejected: (B,) scalar rewards; margin: (B,) or None.
    Returns losses (B,).
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(
            f"r_chosen and r_rejected must have the same shape (B,); got {tuple(r_chosen.shape)}, "
            f"{tuple(r_rejected.shape)}"
        )
    if not center_weight >= 0:
        raise ValueError(f"center_weight must be >= 0; got {center_weight}")
    logits = r_chosen - r_rejected
    if margin is not None:
        if margin.shape != r_chosen.shape:
            raise ValueError(f"margin must have shape {tuple(r_chosen.shape)}; got {tuple(margin.shape)}")
        margin = margin.to(logits.dtype)
        logits = logits - torch.where(torch.isnan(margin), 0.0, margin)
    losses = -F.logsigmoid(logits)
    if center_weight:
        losses = losses + center_weight * (r_chosen + r_rejected) ** 2
    return losses
