"""Router losses of mixture-of-experts models: load balancing (Switch Transformer) and the router z-loss (ST-MoE).

Both take the router logits of one forward pass, stacked over the MoE layers, and a mask of the
tokens that count (1 = a real token, 0 = padding). Each layer's term is computed on its own and
the terms are averaged over layers, so a coefficient does not grow with the model's depth.

Shapes: router_logits (L, N, E) or (N, E) for one layer (N tokens, E experts); mask (N,).
"""

from __future__ import annotations

import torch


def _as_layers(router_logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = router_logits.unsqueeze(0) if router_logits.dim() == 2 else router_logits
    if logits.dim() != 3:
        raise ValueError(f"router_logits must be (L, N, E) or (N, E); got {tuple(router_logits.shape)}")
    n = logits.shape[1]
    if mask is None:
        mask = torch.ones(n, device=logits.device)
    if mask.shape != (n,):
        raise ValueError(f"mask must be ({n},) like the router logits' tokens; got {tuple(mask.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 router logits are upcast, float64 kept
    return logits.to(dtype), mask.to(device=logits.device, dtype=dtype)


def expert_counts(router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """How many real tokens pick each expert among their top-k, per layer.

    The routing of softmax top-k routers (Shazeer et al. 2017; Mixtral, Qwen-MoE, OLMoE):
    token t goes to the k experts of largest softmax(z_t). Returns (L, E) float32 counts
    (no gradient); each layer's counts add up to k x the number of real tokens.
    """
    logits, mask = _as_layers(router_logits, mask)
    chosen = logits.detach().topk(top_k, dim=-1).indices  # (L, N, k)
    weights = mask[None, :, None].expand_as(chosen).to(torch.float32)
    counts = torch.zeros(logits.shape[0], logits.shape[2], device=logits.device)
    return counts.scatter_add_(1, chosen.flatten(1), weights.flatten(1))


def load_balancing_loss(
    router_logits: torch.Tensor,
    top_k: int,
    mask: torch.Tensor | None = None,
    *,
    expert_fraction: torch.Tensor | None = None,
    n_tokens: float | None = None,
) -> torch.Tensor:
    """Auxiliary load-balancing loss, Switch Transformer (Fedus et al. 2022, eqs. 4-6), top-k form.

    Per layer: loss = E * sum_i f_i * P_i, where over the T real tokens
        f_i = (1/T) * #{t : expert i is among the top-k of p_t}   (no gradient; sum_i f_i = k)
        P_i = (1/T) * sum_t p_{t,i},   p_t = softmax(z_t)          (differentiable)
    With k = 1 this is the paper's equation; counting every top-k choice in f is what transformers'
    Mixtral / Qwen-MoE / OLMoE implementations do, so a coefficient means the same here as in their
    configs (``router_aux_loss_coef``). Uniform routing gives k; every token on the same k experts
    with probability near 1/k each gives E. The layers' values are averaged.

    ``expert_fraction`` (L, E): use this f instead of these tokens' own (e.g. f over a whole global
    batch, as in global-batch balancing, Qiu et al. 2025), treated as a constant. ``n_tokens``: the T
    that divides P (default: the real tokens here). With both taken from a global batch, the values
    of its micro-batches add up to the global batch's loss.

    router_logits: (L, N, E) or (N, E); mask: (N,). Returns a scalar, float32 (float64 for float64 logits).
    """
    logits, mask = _as_layers(router_logits, mask)
    n_real = mask.sum()
    denom = n_tokens if n_tokens is not None else n_real.clamp(min=1.0)
    probs = logits.softmax(dim=-1)  # (L, N, E)
    prob_per_expert = (probs * mask[None, :, None]).sum(dim=1) / denom  # (L, E)
    if expert_fraction is None:
        expert_fraction = expert_counts(logits, top_k, mask) / n_real.clamp(min=1.0)
    elif expert_fraction.shape != prob_per_expert.shape:
        raise ValueError(f"expert_fraction must be (L, E) = {tuple(prob_per_expert.shape)}; "
                         f"got {tuple(expert_fraction.shape)}")
    n_experts = logits.shape[-1]
    per_layer = n_experts * (expert_fraction.detach().to(prob_per_expert) * prob_per_expert).sum(dim=-1)
    return per_layer.mean()


def router_z_loss(router_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
                  n_tokens: float | None = None) -> torch.Tensor:
    """Router z-loss, ST-MoE (Zoph et al. 2022, eq. 5): L_z = (1/T) * sum_t (log sum_i exp z_{t,i})^2.

    Penalises large router logits, which keeps the router's softmax numerically stable. Averaged
    over the T real tokens (``n_tokens`` overrides T, e.g. a global batch's count, so micro-batches
    add up) and then over layers.

    router_logits: (L, N, E) or (N, E); mask: (N,). Returns a scalar, float32 (float64 for float64 logits).
    """
    logits, mask = _as_layers(router_logits, mask)
    denom = n_tokens if n_tokens is not None else mask.sum().clamp(min=1.0)
    lse = torch.logsumexp(logits, dim=-1)  # (L, N)
    return ((lse.square() * mask[None, :]).sum(dim=1) / denom).mean()
