"""DPO and the offline pairwise losses that share its implicit reward: cDPO, rDPO, SLiC hinge, IPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
DPO_SMOOTHING_TYPES = ("conservative", "robust")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    smoothing: str = "conservative",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss on the log-ratio margin h = (pc - rc) - (pr - rr).

    All inputs are summed sequence log-probs log π(y|x) (``label_logps(...).sum(-1)`` in models/logprobs.py), shape (B,):
    pc, pr under the policy and rc, rr under the reference, for the chosen and rejected answers.

    - ``sigmoid``: DPO, Rafailov et al. 2023, eq. 7: -log σ(β h). With label smoothing ε
      (the chance a pair's label is flipped):
      ``conservative`` = cDPO (Mitchell 2023, "A note on DPO with noisy preferences"), the
      cross-entropy against soft labels: -(1-ε) log σ(β h) - ε log σ(-β h);
      ``robust`` = rDPO (Chowdhury et al. 2024, "Provably robust DPO"), the unbiased estimate
      of the clean-label loss: [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε).
    - ``hinge``: the SLiC-HF rank-calibration hinge (Zhao et al. 2023) on the DPO log-ratio,
      max(0, 1 - β h), i.e. margin 1/β, as in the DPO paper's comparison.
    - ``ipo``: IPO, Azar et al. 2023, eq. 17: (h - 1/(2β))², where β plays the role of τ.
      The paper's h uses sequence log-probs; pass length-normalised ones for the common variant.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are the implicit
    rewards β (pc - rc) and β (pr - rr), detached (for logging margins and accuracies).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}; got {loss_type!r}")
    if smoothing not in DPO_SMOOTHING_TYPES:
        raise ValueError(f"smoothing must be one of {DPO_SMOOTHING_TYPES}; got {smoothing!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    if not 0 <= label_smoothing < 0.5:
        # At ε = 0.5 the labels carry no information (and rDPO divides by zero).
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is defined only for loss_type 'sigmoid'; got {loss_type!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"policy and reference log-probs must all have the same shape (B,); got {sorted(shapes)}")

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid(.)): stays finite when β h is large and negative.
        if smoothing == "conservative":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        else:
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
