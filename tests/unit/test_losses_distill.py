"""Distillation divergences against values worked out by hand from their definitions."""

import math

import pytest
import torch

from posttrain.losses.distill import distill_token_losses, distill_token_losses_topk

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


def test_topk_with_every_id_equals_the_full_loss_and_renormalises_a_partial_one():
    torch.manual_seed(1)
    teacher, student = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.ones(2, 4)
    logps = torch.log_softmax(teacher, -1)
    order = logps.argsort(-1, descending=True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        full = distill_token_losses(student, teacher, mask, kind=kind, temperature=1.5)
        topk = distill_token_losses_topk(student, logps.gather(-1, order), order, mask, kind=kind, temperature=1.5)
        torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)
    # k = 2 of the hand example's vocabulary extended by a third, never-chosen id: the same as the 2-id case.
    teacher3 = torch.tensor([[[0.0, math.log(3.0), -50.0]]])
    student3 = torch.tensor([[[0.0, 0.0, 7.0]]])
    ids = torch.tensor([[[1, 0]]])
    got = distill_token_losses_topk(student3, torch.log_softmax(teacher3, -1).gather(-1, ids), ids, ONE)
    assert got.item() == pytest.approx(FORWARD, rel=1e-5)


def test_shape_and_kind_errors_are_clear():
    with pytest.raises(ValueError, match="share the tokenizer"):
        distill_token_losses(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_token_losses(STUDENT, TEACHER, ONE, kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        distill_token_losses(STUDENT, TEACHER, ONE, temperature=0)
