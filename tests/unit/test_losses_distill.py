"""Distillation divergences against values worked out by hand from their definitions."""

import math

import pytest
import torch

from posttrain.losses.distill import (
    distill_token_losses,
    distill_token_losses_topk,
    teacher_topk,
)

# Teacher p = softmax([0, ln 3]) = [1/4, 3/4]; student q = softmax([0, 0]) = [1/2, 1/2].
TEACHER = torch.tensor([[[0.0, math.log(3.0)]]])
STUDENT = torch.tensor([[[0.0, 0.0]]])
ONE = torch.ones(1, 1)
# KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2)
FORWARD = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
# KL(q||p) = 1/2 ln 2 + 1/2 ln(2/3)
REVERSE = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
# m = [3/8, 5/8]: 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)] + 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)]
JSD = 0.5 * (0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5)) + 0.5 * (0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5))


@pytest.mark.parametrize("kind, expected", [("forward_kl", FORWARD), ("reverse_kl", REVERSE), ("jsd", JSD)])
def test_divergences_match_the_hand_computed_values(kind, expected):
    assert FORWARD == pytest.approx(0.130812, abs=1e-6) and JSD == pytest.approx(0.033822, abs=1e-6)
    got = distill_token_losses(STUDENT, TEACHER, ONE, kind=kind)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_temperature_softens_both_and_scales_by_its_square():
    # T = 2: p = softmax([0, ln 3] / 2) = [1, √3] / (1 + √3); q stays uniform; the KL is multiplied by T² = 4.
    s = math.sqrt(3.0)
    p = [1 / (1 + s), s / (1 + s)]
    expected = 4 * (p[0] * math.log(2 * p[0]) + p[1] * math.log(2 * p[1]))
    assert expected == pytest.approx(0.145363, abs=1e-6)
    got = distill_token_losses(STUDENT, TEACHER, ONE, kind="forward_kl", temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_masked_positions_give_zero_and_equal_distributions_give_zero_with_zero_gradient():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 5)
    student = teacher.clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        losses = distill_token_losses(student, teacher, mask, kind=kind)
        assert torch.allclose(losses, torch.zeros(2, 3), atol=1e-6)
        (grad,) = torch.autograd.grad(losses.sum(), student)
        assert grad.abs().max() < 1e-6
    other = torch.randn(2, 3, 5)
    losses = distill_token_losses(other, teacher, mask)
    assert (losses[mask == 0] == 0).all() and (losses[mask == 1] > 0).all()


def test_jsd_tends_to_the_scaled_kls_at_its_ends():
    s, t = STUDENT.double(), TEACHER.double()  # the differences are below float32's resolution
    small = distill_token_losses(s, t, ONE, kind="jsd", beta=1e-4).item()
    large = distill_token_losses(s, t, ONE, kind="jsd", beta=1 - 1e-4).item()
    assert small / 1e-4 == pytest.approx(FORWARD, rel=1e-3)
    assert large / 1e-4 == pytest.approx(REVERSE, rel=1e-3)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        distill_token_losses(STUDENT, TEACHER, ONE, kind="jsd", beta=1.0)


def test_topk_with_every_id_equals_the_full_loss():
    torch.manual_seed(1)
    teacher, student = torch.randn(2, 4, 6), torch.randn(2, 4, 6, requires_grad=True)
    mask = torch.ones(2, 4)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        full = distill_token_losses(student, teacher, mask, kind=kind, temperature=1.5)
        lp, ids, rest = teacher_topk(teacher, 6, temperature=1.5)
        assert torch.isneginf(rest).all()  # nothing is left outside the whole vocabulary
        topk = distill_token_losses_topk(student, lp, ids, rest, mask, kind=kind, temperature=1.5)
        torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)
        (g_full,), (g_topk,) = (torch.autograd.grad(x.sum(), student) for x in (full, topk))
        torch.testing.assert_close(g_topk, g_full, rtol=1e-5, atol=1e-6)


# Teacher p = [.4, .4, .05, .05, .05, .05]; student q = [.02, .02, .02, .02, .02, .9]: with k = 2 the teacher's
# top ids are 0 and 1 and both coarsen to k + 1 categories, p' = [.4, .4, .2] and q' = [.02, .02, .96].
P6 = [0.4, 0.4, 0.05, 0.05, 0.05, 0.05]
Q6 = [0.02] * 5 + [0.9]
FORWARD_K2 = 2 * 0.4 * math.log(0.4 / 0.02) + 0.2 * math.log(0.2 / 0.96)
REVERSE_K2 = 2 * 0.02 * math.log(0.02 / 0.4) + 0.96 * math.log(0.96 / 0.2)
# m' = (p' + q') / 2 = [.21, .21, .58]
JSD_K2 = 0.5 * (2 * 0.4 * math.log(0.4 / 0.21) + 0.2 * math.log(0.2 / 0.58)) + 0.5 * (
    2 * 0.02 * math.log(0.02 / 0.21) + 0.96 * math.log(0.96 / 0.58))


@pytest.mark.parametrize("kind, expected", [("forward_kl", FORWARD_K2), ("reverse_kl", REVERSE_K2), ("jsd", JSD_K2)])
def test_topk_counts_the_students_mass_outside_the_k_ids(kind, expected):
    assert FORWARD_K2 == pytest.approx(2.082863, abs=1e-6) and REVERSE_K2 == pytest.approx(1.386042, abs=1e-6)
    teacher, student = torch.tensor([[P6]]).log(), torch.tensor([[Q6]]).log()
    lp, ids, rest = teacher_topk(teacher, 2)
    assert sorted(ids.flatten().tolist()) == [0, 1] and rest.exp().item() == pytest.approx(0.2, rel=1e-6)
    got = distill_token_losses_topk(student, lp, ids, rest, ONE, kind=kind).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # Coarsening loses information, never adds any: a lower bound of the full divergence.
    assert got < distill_token_losses(student, teacher, ONE, kind=kind).item()


def test_topk_forward_kl_is_exact_when_the_teacher_has_no_tail_and_its_gradient_on_the_k_ids_is_the_full_one():
    # The teacher on ids 0 and 1 only, the student 0.9 on id 5: KL = 2 · 1/2 · ln(0.5 / 0.05) = ln 10.
    teacher = torch.tensor([[[0.0, 0.0, -1e4, -1e4, -1e4, -1e4]]])
    student = torch.tensor([[[0.05, 0.05, 0.0, 0.0, 0.0, 0.9]]]).clamp(min=1e-12).log().requires_grad_(True)
    lp, ids, rest = teacher_topk(teacher, 2)
    topk = distill_token_losses_topk(student, lp, ids, rest, ONE)
    full = distill_token_losses(student, teacher, ONE)
    assert topk.item() == pytest.approx(math.log(10.0), rel=1e-5) and full.item() == pytest.approx(math.log(10.0))
    # With a tail: on the k ids the gradient is the full q - p; elsewhere the teacher's leftover is spread like q.
    torch.manual_seed(2)
    teacher, student = torch.randn(1, 3, 8), torch.randn(1, 3, 8, requires_grad=True)
    lp, ids, rest = teacher_topk(teacher, 3)
    (g_topk,) = torch.autograd.grad(distill_token_losses_topk(student, lp, ids, rest, torch.ones(1, 3)).sum(), student)
    q, p = torch.softmax(student.detach(), -1), torch.softmax(teacher, -1)
    torch.testing.assert_close(g_topk.gather(-1, ids), (q - p).gather(-1, ids), rtol=1e-5, atol=1e-6)
    r_p, r_q = rest.exp().unsqueeze(-1), 1 - q.gather(-1, ids).sum(-1, keepdim=True)
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    torch.testing.assert_close(g_topk[outside], (q * (1 - r_p / r_q))[outside], rtol=1e-5, atol=1e-6)


def test_shape_and_kind_errors_are_clear():
    with pytest.raises(ValueError, match="share the tokenizer"):
        distill_token_losses(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_token_losses(STUDENT, TEACHER, ONE, kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        distill_token_losses(STUDENT, TEACHER, ONE, temperature=0)
