"""Advantage estimators for online RL: GAE (PPO), group-normalised (GRPO, Dr. GRPO), leave-one-out (RLOO).

Advantages are targets, not functions of the parameters being trained: everything here runs under
``torch.no_grad`` and returns tensors without gradient, at float32 or wider.
"""

from __future__ import annotations

import torch


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation, Schulman et al. 2016, eq. 16.

    δ_t = r_t + γ V_{t+1} - V_t, with V = 0 after a row's last real token (the episode ends there);
    A_t = Σ_l (γλ)^l δ_{t+l}, computed backwards as A_t = δ_t + γλ A_{t+1}; returns R_t = A_t + V_t
    (the λ-return, the value head's target).

    rewards, values, mask: (B, T) over the response tokens; mask is 1 for real tokens and 0 for the
    padding after the response, so each row's real tokens are a prefix. Rewards and values at
    padding are ignored. Returns (advantages, returns), each (B, T), 0 at padding, no gradient.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            "rewards, values and mask must all have the same shape (B, T); got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    real = mask.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("mask must mark a prefix of each row (real tokens first, then padding); found a gap")
    dtype = _dtype(rewards, values)
    rewards = torch.where(real, rewards.to(dtype), 0.0)
    values = torch.where(real, values.to(dtype), 0.0)
    # Zeroed padding makes V_{t+1} = 0 past the last real token and stops the recursion there.
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.size(0), 1)], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    running = deltas.new_zeros(deltas.size(0))
    for step in reversed(range(deltas.size(1))):
        running = torch.where(real[:, step], deltas[:, step] + gamma * lam * running, 0.0)
        advantages[:, step] = running
    return advantages, torch.where(real, advantages + values, 0.0)


def _groups(rewards: torch.Tensor, group_size: int, minimum: int) -> torch.Tensor:
    """(N,) rewards as (N / group_size, group_size): row g holds the samples of the g-th prompt."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,); got {tuple(rewards.shape)}")
    if group_size < minimum:
        raise ValueError(f"group_size must be >= {minimum}; got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"the number of rewards ({rewards.numel()}) must be a multiple of group_size ({group_size})")
    return rewards.to(_dtype(rewards)).view(-1, group_size)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome-supervision advantages, Shao et al. 2024 (DeepSeekMath), §4.1.2.

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one value per completion, shared by all
    its tokens. std is the sample (unbiased, N - 1) standard deviation, ``torch.std``'s default
    and what TRL's GRPO uses. A group whose rewards are all equal gets A = 0 (0 / eps), not NaN.
    ``scale_by_std=False`` is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"),
    which drops the division because it over-weights groups that are nearly all right or all wrong.

    rewards: (N,), N = prompts x group_size with each prompt's completions consecutive.
    Returns (N,), no gradient.
    """
    grouped = _groups(rewards, group_size, minimum=2)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out, Ahmadian et al. 2024 ("Back to basics"), after Kool et al. 2019.

    A_i = r_i - 1/(k-1) Σ_{j≠i} r_j: each sample's baseline is the mean reward of the other k - 1
    samples of the same prompt, so it does not depend on the sample itself and the estimator stays
    unbiased. Equal to k/(k-1) (r_i - mean(r_group)).

    rewards: (N,), N = prompts x group_size with each prompt's completions consecutive.
    Returns (N,), no gradient.
    """
    grouped = _groups(rewards, group_size, minimum=2)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).view(-1)


@torch.no_grad()
def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``values`` to mean 0 and variance 1 over the masked positions (PPO advantages).

    (x - mean) / sqrt(var + eps) with the mean and the unbiased (N - 1) variance taken over the
    tokens where mask is 1, as TRL's ``masked_whiten``. ``shift_mean=False`` adds the mean back:
    only the scale changes, so the sign of the average advantage is kept.
    The statistics are those of the tensors given: pass the whole batch, not a micro-batch.

    values, mask: the same shape, typically (B, T). Returns that shape, 0 where mask is 0, no gradient.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape; got {tuple(values.shape)}, {tuple(mask.shape)}")
    real = mask.bool()
    count = int(real.sum())
    if count < 2:
        raise ValueError(f"whiten needs at least 2 masked values for a variance; got {count}")
    values = values.to(_dtype(values))
    masked = torch.where(real, values, 0.0)
    mean = masked.sum() / count
    var = torch.where(real, (values - mean) ** 2, 0.0).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, 0.0)


@torch.no_grad()
def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """True for each group whose rewards are all exactly equal.

    Such a group has zero group-normalised advantage, so it adds no policy gradient; DAPO's
    dynamic sampling (Yu et al. 2025, §3.2) filters these groups out and samples more.

    rewards: (N,), N = prompts x group_size with each prompt's completions consecutive.
    Returns a bool tensor of shape (N / group_size,).
    """
    grouped = _groups(rewards, group_size, minimum=1)
    return (grouped == grouped[:, :1]).all(dim=1)
