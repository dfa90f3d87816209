"""Router losses against values worked out by hand from the equations, and at their limits."""

import math

import pytest
import torch

from posttrain.losses.moe import expert_counts, load_balancing_loss, router_z_loss


def _logits(probs, shift=None):
    """Router logits whose softmax is exactly ``probs``; ``shift`` adds a constant per token (softmax ignores it)."""
    z = torch.tensor(probs, dtype=torch.float64).log()
    if shift is not None:
        z = z + torch.tensor(shift, dtype=torch.float64)[:, None]
    return z


# Three tokens, three experts (rows are softmax probabilities, no ties).
P3 = [[0.5, 0.3, 0.2], [0.3, 0.6, 0.1], [0.7, 0.1, 0.2]]


def test_top1_by_hand():
    # top-1 picks experts 0, 1, 0: f = (2/3, 1/3, 0); P = (1.4, 0.95, 0.65) / 3 with these probabilities
    probs = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.7, 0.1, 0.2]]
    loss = load_balancing_loss(_logits(probs), top_k=1)
    # E * sum f_i P_i = 3 * (2/3 * 1.4/3 + 1/3 * 0.95/3) = 3 * 3.75 / 9
    assert float(loss) == pytest.approx(1.25, rel=1e-6)


def test_top2_by_hand():
    # top-2 sets: {0,1}, {1,0}, {0,2}: counts (3, 2, 1) over 3 tokens -> f = (1, 2/3, 1/3), sum = k = 2
    # P = (1.5, 1.0, 0.5) / 3; E * sum f P = 3 * (1/2 + 2/9 + 1/18) = 7/3
    assert float(load_balancing_loss(_logits(P3), top_k=2)) == pytest.approx(7 / 3, rel=1e-6)
    assert expert_counts(_logits(P3), top_k=2).tolist() == [[3.0, 2.0, 1.0]]


def test_padding_is_masked_out():
    padded = _logits(P3 + [[0.1, 0.1, 0.8]])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert float(load_balancing_loss(padded, 2, mask)) == pytest.approx(7 / 3, rel=1e-6)
    assert float(load_balancing_loss(padded, 2)) != pytest.approx(7 / 3, rel=1e-3)
    assert float(router_z_loss(padded + 1.0, mask)) == pytest.approx(1.0, rel=1e-6)
    assert expert_counts(padded, 2, mask).sum() == 6  # k x real tokens


def test_layers_are_averaged():
    # second layer: every token prefers experts 2 then 1: f = (0, 1, 1), P = (0.2, 0.3, 0.5) -> 3 * 0.8 = 2.4
    second = _logits([[0.2, 0.3, 0.5]] * 3)
    loss = load_balancing_loss(torch.stack([_logits(P3), second]), top_k=2)
    assert float(loss) == pytest.approx((7 / 3 + 2.4) / 2, rel=1e-6)


def test_z_loss_by_hand():
    # log-sum-exp of log(p) + c is c: L_z = mean of c^2 = (1 + 4 + 1) / 3
    z = _logits(P3, shift=[1.0, 2.0, -1.0])
    assert float(router_z_loss(z)) == pytest.approx(2.0, rel=1e-6)
    # two experts with logits 0: (log 2)^2
    assert float(router_z_loss(torch.zeros(5, 2))) == pytest.approx(math.log(2) ** 2, rel=1e-6)
    # the load-balancing loss only sees softmax, which ignores the shift
    assert float(load_balancing_loss(z, 2)) == pytest.approx(7 / 3, rel=1e-6)


def test_limits():
    # balanced: f = P = 1/E in every coordinate gives k (here 1 of 2 experts)
    balanced = _logits([[0.6, 0.4], [0.4, 0.6]])
    assert float(load_balancing_loss(balanced, 1)) == pytest.approx(1.0, rel=1e-6)
    # collapsed: every token on expert 0 with probability ~1 gives E
    collapsed = torch.tensor([[30.0, 0.0, 0.0, 0.0]] * 4)
    assert float(load_balancing_loss(collapsed, 1)) == pytest.approx(4.0, rel=1e-6)


def test_global_fraction_splits_into_micro_batch_parts():
    """With f and T of the whole batch, the parts of two micro-batches add up to the whole, value and gradient."""
    z = torch.randn(2, 10, 4, dtype=torch.float64)  # 2 layers, 10 tokens, 4 experts
    mask = torch.tensor([1.0] * 8 + [0.0] * 2, dtype=torch.float64)
    whole_z = z.clone().requires_grad_(True)
    whole = load_balancing_loss(whole_z, 2, mask) + router_z_loss(whole_z, mask)
    whole.backward()

    fraction = expert_counts(z, 2, mask) / mask.sum()
    part_z = z.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 3), slice(3, 10)):
        total = total + load_balancing_loss(part_z[:, sl], 2, mask[sl], expert_fraction=fraction, n_tokens=8.0)
        total = total + router_z_loss(part_z[:, sl], mask[sl], n_tokens=8.0)
    total.backward()
    assert float(total.detach()) == pytest.approx(float(whole.detach()), rel=1e-10)
    torch.testing.assert_close(part_z.grad, whole_z.grad)
    # without the global fraction each part balances its own tokens, which is a different quantity
    own = sum(load_balancing_loss(z[:, sl], 2, mask[sl]) * n / 8 for sl, n in ((slice(0, 3), 3), (slice(3, 10), 5)))
    assert float(own) != pytest.approx(float(load_balancing_loss(z, 2, mask)), rel=1e-3)


def test_one_layer_matches_transformers():
    """For one layer our loss is transformers' Mixtral/Qwen-MoE load_balancing_loss_func (padding masked)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        load_balancing_loss_func,
    )

    torch.manual_seed(0)
    z = torch.randn(2 * 6, 4)
    attention = torch.ones(2, 6)
    attention[1, 4:] = 0
    ours = load_balancing_loss(z, 2, attention.reshape(-1))
    theirs = load_balancing_loss_func((z,), num_experts=4, top_k=2, attention_mask=attention)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="mask must be"):
        load_balancing_loss(torch.zeros(3, 4), 1, torch.ones(2))
    with pytest.raises(ValueError, match="expert_fraction"):
        load_balancing_loss(torch.zeros(3, 4), 1, expert_fraction=torch.zeros(2, 4))
