"""Logit distillation: per-token divergences between a teacher's and a student's next-token distributions.

With ``p`` the teacher's and ``q`` the student's distribution at one position, both taken as
``softmax(logits / T)``:

- forward KL (Hinton et al. 2015): ``KL(p || q) = Σ_v p_v (log p_v − log q_v)``. Mode-covering: the
  student is pushed to put mass wherever the teacher does.
- reverse KL (MiniLLM, Gu et al. 2024, eq. 1): ``KL(q || p) = Σ_v q_v (log q_v − log p_v)``. Mode-seeking.
- generalised JSD (GKD, Agarwal et al. 2024, eq. 2) with ``m = β p + (1 − β) q``:
  ``JSD_β = β KL(p || m) + (1 − β) KL(q || m)``, for ``0 < β < 1``; ``β = 0.5`` is the usual JSD.
  Near β = 0 it behaves like β · forward KL, near β = 1 like (1 − β) · reverse KL (both → 0 at the ends,
  which is why the ends are the separate ``forward_kl`` and ``reverse_kl`` kinds).

Every divergence is multiplied by ``T²`` (Hinton et al. 2015, §2) so that its gradients keep the same
scale whatever the temperature. Positions where ``mask`` is 0 (prompt, padding) give 0.

Shapes: logits (B, L, V); mask (B, L); results (B, L).

With a top-k teacher (``distill_token_losses_topk``, e.g. a precomputed cache) only the teacher's k most likely
ids S are known, plus its total probability outside them. Both distributions are then coarsened to k + 1
categories, the k ids and "every other id" (the student's full softmax at the k ids and its own leftover
1 − Σ_S q_v; nothing is renormalised), and the divergence is taken between the coarsened distributions.
Coarsening never increases a divergence (data-processing inequality), so this is a lower bound of the full
one, and it still sees the mass the student puts outside S. For forward KL it equals the full divergence when
the teacher puts no mass outside S, and its gradient with respect to the logits of the k ids is exactly the
full one (``q_v − p_v``); the ids outside S get ``q_v (1 − r_p / r_q)``, the full gradient with the teacher's
leftover ``r_p`` spread over them in proportion to the student's ``q_v / r_q``. For reverse KL and JSD it is
exact when, outside S, the student's distribution is proportional to the teacher's.
"""

from __future__ import annotations

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits lose too much in a softmax over a large vocabulary); float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v (log a_v − log b_v) over the last dimension; 0 · log 0 counts as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """The divergence between teacher ``p`` and student ``q`` (log-probs over the last dim) at each position."""
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1 (use forward_kl or reverse_kl for the ends); got {beta}")
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                                             log_q + torch.log(torch.tensor(1 - beta, dtype=log_q.dtype))]), dim=0)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(KINDS)}")


def distill_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence (B, L) between full teacher and student logits (B, L, V), times T², masked."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape (B, L, V); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)} (do they share the tokenizer?)"
        )
    return _tempered(student_logits, teacher_logits, mask, kind, temperature, beta)


def _tempered(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str, temperature: float,
              beta: float) -> torch.Tensor:
    """The divergence of softmax(scores / T) over the last dim (aligned ids), times T², masked."""
    _check_temperature(temperature)
    log_q = torch.log_softmax(_wide(student) / temperature, dim=-1)
    log_p = torch.log_softmax(_wide(teacher) / temperature, dim=-1)
    return _masked(divergence(log_p, log_q, kind, beta) * temperature**2, mask)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _masked(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A select, not a product: a position outside the mask may hold padding that gives NaN, and 0 · NaN is NaN.
    return torch.where(mask.bool(), losses, torch.zeros_like(losses))


def _rest(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v not in ids} exp(log_probs_v) over the last dim, (...,): the log-probability of every other id."""
    return log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """The teacher as ``distill_token_losses_topk`` takes it: its k most likely ids at each position.

    Returns ``(logps, ids, rest)``: ``log softmax(teacher_logits / T)`` over the full vocabulary at the ids
    (..., k), not renormalised; the ids (..., k), most likely first; and the log of the probability of every
    other id (...,), ``-inf`` when k is the whole vocabulary. k is cut to the vocabulary size.
    """
    _check_temperature(temperature)
    log_p = torch.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    logps, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    return logps, ids, _rest(log_p, ids)


def distill_token_losses_topk(
    student_logits: torch.Tensor,
    teacher_logps: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_rest: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """As ``distill_token_losses`` with the teacher known only at its top-k ids, on k + 1 categories (module doc).

    ``teacher_logps`` (B, L, k): the teacher's log-probs at temperature ``T`` (over its full vocabulary, not
    renormalised) of the ids ``teacher_ids`` (B, L, k), distinct at each position; ``teacher_rest`` (B, L): the
    log of its probability outside them (``teacher_topk`` gives all three). The student's logits (B, L, V)
    are tempered and normalised over all V ids. When k = V the "every other id" category is empty and left out.
    """
    if (teacher_logps.shape != teacher_ids.shape or teacher_ids.shape[:2] != student_logits.shape[:2]
            or teacher_rest.shape != teacher_ids.shape[:2]):
        raise ValueError(
            f"teacher top-k log-probs {tuple(teacher_logps.shape)} and ids {tuple(teacher_ids.shape)} must both be "
            f"(B, L, k) and its leftover {tuple(teacher_rest.shape)} (B, L), with (B, L) = "
            f"{tuple(student_logits.shape[:2])}"
        )
    _check_temperature(temperature)
    ids = teacher_ids.long()
    log_q_all = torch.log_softmax(_wide(student_logits) / temperature, dim=-1)
    log_q = log_q_all.gather(-1, ids)
    log_p = teacher_logps.to(log_q.dtype)
    if ids.shape[-1] < student_logits.shape[-1]:
        log_q = torch.cat([log_q, _rest(log_q_all, ids).unsqueeze(-1)], dim=-1)
        log_p = torch.cat([log_p, teacher_rest.to(log_q.dtype).unsqueeze(-1)], dim=-1)
    return _masked(divergence(log_p, log_q, kind, beta) * temperature**2, mask)


def mixed_token_losses(nll: torch.Tensor, divergence: torch.Tensor, hard_weight: float) -> torch.Tensor:
    """Hinton et al. (2015, §2): a weighted average of the hard-label and the soft-label objectives, per token.

    ``hard_weight · NLL + (1 − hard_weight) · D`` where ``NLL = −log q(y)`` is the student's loss on the
    data's own token at T = 1 and ``D`` the T²-scaled divergence of ``distill_token_losses`` (the T² keeps
    the two terms' gradients on one scale, so ``hard_weight`` means the same at any temperature).
    ``hard_weight = 0`` is pure distillation. Shapes: any, the same for both; the result has that shape.
    """
    if not 0 <= hard_weight <= 1:
        raise ValueError(f"hard_weight must be in [0, 1]; got {hard_weight}")
    if nll.shape != divergence.shape:
        raise ValueError(f"nll {tuple(nll.shape)} and divergence {tuple(divergence.shape)} must have one shape")
    return hard_weight * nll + (1 - hard_weight) * divergence


__all__ = ["KINDS", "distill_token_losses", "distill_token_losses_topk", "divergence", "mixed_token_losses",
           "teacher_topk"]
