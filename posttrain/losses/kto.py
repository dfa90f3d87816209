"""KTO: a prospect-theoretic loss on unpaired desirable / undesirable answers."""

from __future__ import annotations

import torch


def kto_kl(sum_of_differences: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """The KTO reference point z0 = max(0, mean(log π(y'|x) - log π_ref(y'|x))), detached.

    Ethayarajh et al. 2024, eq. 8 and §4.2: z0 estimates KL(π || π_ref) from mismatched pairs
    (each prompt x with another example's completion y'), clamped at 0 because a KL is never
    negative, and not back-propagated through, as in the paper's implementation.

    Takes a sum and a count rather than the per-pair values because the mean must be over the
    whole global batch: the caller adds up micro-batches and all-reduces across processes first,
    so accumulated and distributed runs get the same z0 as one big batch.

    sum_of_differences: scalar, Σ (policy - reference) summed sequence log-probs;
    count: number of pairs in the sum (no pairs gives z0 = 0).
    Returns a scalar tensor with no gradient.
    """
    count = torch.as_tensor(count, device=sum_of_differences.device).clamp(min=1)
    return (sum_of_differences.detach() / count).clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Ethayarajh et al. 2024, eq. 8: λ_y - v(x, y) per example, with r = log π/π_ref:

    desirable:   λ_D (1 - σ(β (r - z0)))
    undesirable: λ_U (1 - σ(β (z0 - r)))

    λ_D, λ_U (``desirable_weight``, ``undesirable_weight``) set loss aversion and make up for
    class imbalance (the paper keeps λ_D n_D / (λ_U n_U) in [1, 4/3]).

    policy_logps, ref_logps: (B,) summed sequence log-probs; desirable: (B,) bool;
    kl: scalar z0 from ``kto_kl``.
    Returns (losses, rewards), each (B,); rewards = β r, detached.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    if not (desirable_weight >= 0 and undesirable_weight >= 0):
        raise ValueError(
            f"desirable_weight and undesirable_weight must be >= 0; got {desirable_weight}, {undesirable_weight}"
        )
    if policy_logps.shape != ref_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps and desirable must have the same shape (B,); got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(desirable.shape)}"
        )
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor; got {desirable.dtype}")
    if kl.dim() != 0:
        raise ValueError(f"kl must be a scalar tensor; got shape {tuple(kl.shape)}")

    ratio = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach()
