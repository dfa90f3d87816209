"""A pull of the trained parameters toward their values at the start of the stage, against forgetting."""

from __future__ import annotations

import torch


def l2_to_start(params: list[torch.Tensor], start: list[torch.Tensor], coef: float) -> torch.Tensor:
    """(coef / 2) * sum_i ||params_i - start_i||^2, a scalar float32 differentiable in ``params``.

    The L2-SP penalty of Li, Grandvalet & Davoine (2018), "Explicit Inductive Bias for Transfer
    Learning with Convolutional Networks", section 3 (alpha/2 ||w_S - w_S^0||^2, here over every
    trained parameter), which is also EWC's penalty (Kirkpatrick et al. 2017, eq. 3:
    lambda/2 sum_i F_i (theta_i - theta*_i)^2) with every Fisher weight F_i = 1.

    params, start: tensors of matching shapes (start is a frozen copy); coef >= 0. Its gradient with
    respect to params_i is coef * (params_i - start_i).
    """
    total = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    for p, p0 in zip(params, start, strict=True):
        total = total + (p.float() - p0.float()).pow(2).sum()
    return 0.5 * coef * total
