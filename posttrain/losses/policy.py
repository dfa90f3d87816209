"""Policy-gradient losses for online RL (PPO, GRPO, DAPO, Dr. GRPO): clipped surrogate, KL, value loss, reduction."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("token", "sequence", "fixed")

# Elements of logits upcast at a time by entropy_from_logits (64 MiB of float32), as in models/logprobs.py.
_CHUNK_ELEMENTS = 2**24


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors.values()}
    if len(shapes) != 1:
        got = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
        raise ValueError(f"{', '.join(tensors)} must have the same shape; got {got}")


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(π || π_ref) at tokens sampled from π.

    Schulman 2020, "Approximating KL divergence". With log r = ref_logp - logp, the log of
    π_ref / π at the sampled token:
    - ``k1`` = -log r = logp - ref_logp: unbiased, high variance, can be negative;
    - ``k2`` = ½ (log r)²: biased, low variance, always >= 0;
    - ``k3`` = (r - 1) - log r: unbiased and always >= 0 (GRPO, Shao et al. 2024, eq. 4).
    k3 uses expm1 so that it stays accurate when π and π_ref are close.

    logp, ref_logp: (B, T) log-probs of the sampled tokens under the policy and the reference.
    Returns (B, T); mask it with ``aggregate``. Differentiable in both arguments.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {KL_ESTIMATORS}; got {kind!r}")
    _same_shape(logp=logp, ref_logp=ref_logp)
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(log_ratio) - log_ratio


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, Schulman et al. 2017, eq. 7, negated to a loss, per token.

    ratio = exp(logp - old_logp);
    loss = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A).
    Separate ``clip_low`` and ``clip_high`` are DAPO's decoupled clip ("Clip-Higher", Yu et al.
    2025, §3.1): a larger upper bound lets unlikely tokens with positive advantage grow.

    logp: (B, T) log-probs of the sampled tokens under the policy being trained;
    old_logp: (B, T) the same under the policy that sampled them; advantages: (B,) (one per
    sequence, as GRPO, broadcast over tokens) or (B, T) (per token, as GAE).
    old_logp and advantages are treated as constants (detached).

    Returns (per_token_loss (B, T), clipped (B, T) bool). ``clipped`` marks the tokens where the
    clipped term is strictly the smaller one, i.e. where the loss has zero gradient; its masked
    mean is the clip fraction to log.
    """
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1); got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0; got {clip_high}")
    _same_shape(logp=logp, old_logp=old_logp)
    if advantages.shape == logp.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must have shape (B,) or (B, T) = {tuple(logp.shape)}; got {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantages
    clipped_objective = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    # Where the clipped term is strictly smaller the ratio is strictly outside the clip range, so
    # the clamp passes no gradient; on a tie both terms carry the same gradient.
    return -torch.minimum(unclipped, clipped_objective), clipped_objective < unclipped


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip: float | None = 0.2,
) -> torch.Tensor:
    """PPO's clipped value loss, per token (Schulman et al. 2017's implementation, openai/baselines ppo2).

    ½ max((V - R)², (clip(V, V_old - c, V_old + c) - R)²): as for the policy, a new value more than
    c away from the one at sampling time gets no gradient when moving it back would not help.
    ``clip=None`` gives the plain ½ (V - R)².

    values: (B, T) from the value head being trained; old_values: (B, T) at sampling time;
    returns: (B, T) the targets (e.g. GAE returns). old_values and returns are detached.
    Returns (B, T); mask it with ``aggregate``.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None; got {clip}")
    _same_shape(values=values, old_values=old_values, returns=returns)
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    old_values = old_values.detach()
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    return 0.5 * torch.maximum(unclipped, (clipped_values - returns) ** 2)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Sum a per-token loss over the masked tokens, returning the sum and the units to divide it by.

    - ``token``: Σ masked tokens; units = number of masked tokens. Every token of the global batch
      weighs the same (DAPO's token-level loss, Yu et al. 2025, §3.3).
    - ``sequence``: Σ over rows of each row's masked mean; units = rows with at least one token.
      Every sequence weighs the same (GRPO as written, Shao et al. 2024, eq. 3).
    - ``fixed``: Σ masked tokens; units = rows x ``max_tokens`` (required here, ignored otherwise).
      A constant divisor, so longer answers are not down-weighted (Dr. GRPO, Liu et al. 2025).

    A sum and its units rather than a mean: the caller adds the sums and the units over all
    micro-batches and processes of the global batch and divides once, so accumulated or
    distributed steps equal one big batch. Positions where mask is 0 never count, even if they
    hold inf or NaN.

    per_token, mask: (B, T). Returns (loss_sum: scalar tensor, units: float).
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}; got {mode!r}")
    if per_token.dim() != 2:
        raise ValueError(f"per_token must have shape (B, T); got {tuple(per_token.shape)}")
    _same_shape(per_token=per_token, mask=mask)
    real = mask.bool()
    masked = torch.where(real, per_token, 0.0)
    if mode == "token":
        return masked.sum(), float(real.sum())
    if mode == "sequence":
        counts = real.sum(dim=1)
        return (masked.sum(dim=1) / counts.clamp(min=1)).sum(), float((counts > 0).sum())
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"mode 'fixed' needs max_tokens >= 1 (the generation length limit); got {max_tokens}")
    return masked.sum(), float(per_token.size(0) * max_tokens)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, H = -Σ_v p_v log p_v, for logging.

    Computed at float32 (float64 for float64 logits) a chunk of positions at a time, so no
    full-size float32 copy of the logits is ever made. No gradient.

    logits: (B, T, V). Returns (B, T).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V); got {tuple(logits.shape)}")
    batch, length, vocab = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    entropy = torch.empty(batch, length, dtype=dtype, device=logits.device)
    positions = max(1, _CHUNK_ELEMENTS // vocab)
    # Chunks are slices of one row at a time, views of the logits whatever their strides.
    for row in range(batch):
        for start in range(0, length, positions):
            probs = torch.softmax(logits[row, start : start + positions].to(dtype), dim=-1)
            # entr(0) = 0, so masked-out (-inf) logits add nothing instead of 0 * -inf = NaN.
            entropy[row, start : start + positions] = torch.special.entr(probs).sum(dim=-1)
    return entropy
