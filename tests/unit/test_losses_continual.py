"""Per-task sums of the NLL, and the L2 pull toward the starting weights, against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.data.collate import collate
from posttrain.losses.l2sp import l2_to_start
from posttrain.losses.nll import IGNORE_INDEX, group_sums
from posttrain.trainers.loop import Trainer
from posttrain.trainers.supervised import SupervisedMethod


def test_group_sums_on_hand_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    groups = torch.tensor([[0, 1, -1], [1, 1, 0]])
    sums, counts = group_sums(values, groups, 3)
    assert sums.tolist() == [7.0, 11.0, 0.0]
    assert counts.tolist() == [2, 3, 0]


def test_l2_to_start_value_and_gradient_on_hand_values():
    params = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    start = [torch.tensor([0.0, 0.0]), torch.tensor([[1.5]])]
    penalty = l2_to_start(params, start, coef=0.3)
    # 0.3 / 2 * (1 + 4 + 1)
    assert float(penalty.detach()) == pytest.approx(0.9)
    grads = torch.autograd.grad(penalty, params)
    assert grads[0].tolist() == pytest.approx([0.3, 0.6])  # coef * (theta - theta_start)
    assert grads[1].tolist() == [[pytest.approx(-0.3)]]
    assert float(l2_to_start(params, [p.detach() for p in params], coef=5.0).detach()) == 0.0  # at the start: nothing


def test_per_task_losses_add_up_to_the_batch_loss(model):
    method = SupervisedMethod(0, ["a", "b", "c"])  # "c" has no token in the batch
    rows = [[([5, 6, 7, 8], [IGNORE_INDEX, 6, 7, 8], 0), ([9, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, 11], 1)],
            [([12, 13], [IGNORE_INDEX, 13], 1)]]
    batch = method.collate(rows)
    loss, metrics = method.loss(model, batch)
    loss = float(loss.detach())
    units = method.count(batch)
    assert units == 5
    assert metrics["loss/c"] == (0.0, 0) and metrics["token_share/c"] == 0.0
    assert metrics["loss/a"][1] == 3 and metrics["loss/b"][1] == 2
    assert metrics["loss/a"][0] + metrics["loss/b"][0] == pytest.approx(loss, rel=1e-6)
    # The same rows without tasks: the loss of the untouched method, and no metrics.
    plain_loss, plain = SupervisedMethod(0).loss(model, collate([[s[:2] for s in row] for row in rows], 0))
    assert plain == {} and float(plain_loss.detach()) == pytest.approx(loss, rel=1e-6)


def test_the_loop_adds_the_penalty_gradient_once_per_update():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    w.grad = torch.tensor([0.5, 0.5])  # the data loss's accumulated gradient
    trainer = Trainer.__new__(Trainer)
    trainer.trainable = [w]
    trainer.start_values = [torch.tensor([0.0, 1.0])]
    trainer.tcfg = SimpleNamespace(l2_to_start=0.2)
    trainer.acc = SimpleNamespace(scaler=None)
    logged = trainer._pull_to_start()
    # grad += 0.2 * (w - w0) = 0.2 * [1, -2]
    assert w.grad.tolist() == pytest.approx([0.7, 0.1])
    assert logged["l2_penalty"] == pytest.approx(0.1 * 5)
    assert logged["l2_distance"] == pytest.approx(math.sqrt(5))
    assert w.tolist() == [1.0, -1.0]  # the weights themselves are the optimizer's business
