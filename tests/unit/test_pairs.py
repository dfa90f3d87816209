"""Tokenized preference shapes: masks, the KTO mismatched pair, and KTO's reference point over a batch."""

import numpy as np
import pytest
import torch

from posttrain.data.pairs import FeedbackSet, _derangement
from posttrain.data.templates import IGNORE_INDEX


def _feedback_set():
    # prompt tokens then response tokens; labels only on the response
    ids = [np.array([1, 10, 11, 2, 20, 21]), np.array([1, 12, 2, 30]), np.array([1, 13, 14, 15, 2, 40, 41, 42])]
    plen = np.array([4, 3, 5])
    labels = [np.where(np.arange(len(x)) >= p, x, IGNORE_INDEX) for x, p in zip(ids, plen)]
    return FeedbackSet(ids, labels, plen, np.array([True, False, True]), np.array([1, 2, 0]))


def test_mismatched_pair_is_own_prompt_with_partner_response():
    fs = _feedback_set()
    ids, labels = fs.mismatched(0)  # prompt of 0 + response of 1
    assert ids == [1, 10, 11, 2, 30]
    assert labels == [IGNORE_INDEX] * 4 + [30]
    ids, labels = fs.mismatched(2)  # prompt of 2 + response of 0
    assert ids == [1, 13, 14, 15, 2, 20, 21]
    assert labels == [IGNORE_INDEX] * 5 + [20, 21]


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_partners_are_never_oneself(n):
    import random

    partner = _derangement(n, random.Random(0))
    assert sorted(partner.tolist()) == list(range(n))  # every response is lent exactly once
    assert all(partner[i] != i for i in range(n))


def test_kto_reference_point_is_the_mean_over_all_micro_batches(monkeypatch):
    """z0 = max(0, mean over the global batch of log pi(y'|x) - log pi_ref(y'|x)), one value for every micro-batch."""
    from posttrain.trainers import preference as pref

    fs = _feedback_set()
    fs.ref = np.array([[0.0, -1.0], [0.0, -2.0], [0.0, -4.0]], dtype=np.float32)
    method = pref.FeedbackMethod.__new__(pref.FeedbackMethod)
    method.cfg, method.pad_id, method.reference, method.chunked = None, 3, None, True
    batches = [method.collate([fs.row(0), fs.row(1)]), method.collate([fs.row(2)])]
    policy_kl = {0: -0.5, 1: -1.0, 2: -1.5}  # log pi of each example's mismatched pair
    calls = iter([torch.tensor([policy_kl[0], policy_kl[1]]), torch.tensor([policy_kl[2]])])
    monkeypatch.setattr(pref, "label_logps", lambda model, inputs, labels, chunked: next(calls)[:, None])
    monkeypatch.setattr("posttrain.trainers.reference.unwrap", lambda m: m)

    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kw):
            return type("Out", (), {"logits": None})()

    method.prepare_step(Policy(), batches, lambda values: values)
    # differences: -0.5 - -1 = 0.5; -1 - -2 = 1.0; -1.5 - -4 = 2.5 -> mean 4.0 / 3 = 1.3333
    for b in batches:
        assert float(b["kl"][0]) == pytest.approx(4.0 / 3.0)
