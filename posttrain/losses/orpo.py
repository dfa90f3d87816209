"""ORPO: supervised fine-tuning plus an odds-ratio preference penalty, with no reference model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest mean token log-prob at which log(1 - p) is evaluated (p = 1 - 1e-7). At a = 0 the odds
# are infinite and log(-expm1(a)) is -inf, whose gradient turns the whole loss into NaN.
_MAX_MEAN_LOGP = -1e-7


def _log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(a), a = mean token log-prob <= 0: ORPO's odds.

    log(1 - p) is computed as log(-expm1(a)), not log1p(-exp(a)): near a = 0, the region that
    matters (a likely answer), 1 - exp(a) cancels catastrophically (in float32 it is off by 20%
    at a = -1e-7 and exactly 0 for |a| < 3e-8), while expm1 keeps full relative precision. For very
    negative a, -expm1(a) is within 1e-7 of 1 and its log is off by at most ~1e-7 absolute:
    negligible next to the log-odds differences the loss compares.

    Above _MAX_MEAN_LOGP only the log(1 - p) term is frozen; the leading a still carries a
    gradient of the right sign, so an almost-certain rejected answer is still pushed down.
    """
    return mean_logps - torch.log(-torch.expm1(mean_logps.clamp(max=_MAX_MEAN_LOGP)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO, Hong et al. 2024, eqs. 2-7: L = L_SFT + λ L_OR, per pair.

    With a = log π(y|x) / |y| the mean token log-prob (the paper's P(y|x) is its exp):
    L_SFT = -a_w (the NLL of the chosen answer, averaged over its tokens);
    odds(y) = p / (1 - p), log odds = a - log(1 - exp(a));
    L_OR = -log σ(log odds(y_w) - log odds(y_l)) = -log σ(log of the odds ratio).

    chosen_logps, rejected_logps: (B,) summed sequence log-probs under the policy;
    chosen_len, rejected_len: (B,) scored-token counts (labelled tokens per sequence), > 0.
    Returns (losses, nll, odds_ratio_loss, chosen_rewards, rejected_rewards), each (B,):
    losses = nll + lam * odds_ratio_loss, the two terms kept in the graph for the caller to log;
    the rewards are a_w and a_l, detached. The odds are monotone in a, so "chosen_rewards >
    rejected_rewards" is exactly "the odds ratio favours the chosen answer": the accuracy
    that ORPO's L_OR optimises.
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0; got {lam}")
    shapes = {tuple(t.shape) for t in (chosen_logps, rejected_logps, chosen_len, rejected_len)}
    if len(shapes) != 1:
        raise ValueError(f"log-probs and lengths must all have the same shape (B,); got {sorted(shapes)}")

    chosen_mean = chosen_logps / chosen_len.to(chosen_logps.dtype)
    rejected_mean = rejected_logps / rejected_len.to(rejected_logps.dtype)
    nll = -chosen_mean
    odds_ratio_loss = -F.logsigmoid(_log_odds(chosen_mean) - _log_odds(rejected_mean))
    losses = nll + lam * odds_ratio_loss
    return losses, nll, odds_ratio_loss, chosen_mean.detach(), rejected_mean.detach()
