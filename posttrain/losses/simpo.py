"""SimPO: a reference-free pairwise loss on length-normalised log-probs with a target margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, Meng et al. 2024, eq. 6: -log σ(r_w - r_l - γ) with r = β / |y| · log π(y|x).

    Dividing by the length makes the reward the mean token log-prob, so the policy cannot win
    by writing longer answers; γ is the target reward margin between chosen and rejected.

    chosen_logps, rejected_logps: (B,) summed sequence log-probs under the policy;
    chosen_len, rejected_len: (B,) scored-token counts (labelled tokens per sequence), > 0.
    Returns (losses, chosen_rewards, rejected_rewards), each (B,); rewards detached.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    shapes = {tuple(t.shape) for t in (chosen_logps, rejected_logps, chosen_len, rejected_len)}
    if len(shapes) != 1:
        raise ValueError(f"log-probs and lengths must all have the same shape (B,); got {sorted(shapes)}")

    chosen_rewards = beta * chosen_logps / chosen_len.to(chosen_logps.dtype)
    rejected_rewards = beta * rejected_logps / rejected_len.to(rejected_logps.dtype)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
