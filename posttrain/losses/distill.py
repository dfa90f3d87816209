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

Shapes: logits (B, L, V); mask (B, L); results (B, L). With a top-k teacher cache the teacher is given
as ``teacher_logps`` (B, L, k) at the vocabulary ids ``teacher_ids`` (B, L, k): both distributions are
then restricted to those k ids and renormalised there (exact when the teacher's mass outside its top
k is negligible, which is why k of 20–100 is enough in practice).
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
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    log_q = torch.log_softmax(_wide(student) / temperature, dim=-1)
    log_p = torch.log_softmax(_wide(teacher) / temperature, dim=-1)
    return divergence(log_p, log_q, kind, beta) * temperature**2 * mask.to(log_q.dtype)


def distill_token_losses_topk(
    student_logits: torch.Tensor,
    teacher_logps: torch.Tensor,
    teacher_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """As ``distill_token_losses`` with the teacher given only at its top-k ids (a precomputed cache).

    ``teacher_logps``: the teacher's log-probs at temperature 1 of the ids ``teacher_ids`` (B, L, k).
    They are re-tempered here (``log p / T``, renormalised over the k ids), so one cache serves any T.
    """
    if teacher_logps.shape != teacher_ids.shape or teacher_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher top-k log-probs {tuple(teacher_logps.shape)} and ids {tuple(teacher_ids.shape)} must both be "
            f"(B, L, k) with (B, L) = {tuple(student_logits.shape[:2])}"
        )
    student_at = torch.gather(_wide(student_logits), -1, teacher_ids.long())
    return _tempered(student_at, teacher_logps, mask, kind, temperature, beta)


__all__ = ["KINDS", "divergence", "distill_token_losses", "distill_token_losses_topk"]
