"""data.mixing and data.replay: task shares, whole-row quotas and the per-epoch plan over tasks."""

import math
from collections import Counter

import pytest

from posttrain.config import DataConfig
from posttrain.data.mixing import REPLAY_TASK, make_sampler, quotas, task_shares
from posttrain.errors import PosttrainError

# Three tasks of 600, 150 and 50 rows (ids 0, 1, 2), rows of one task apart from each other's.
NAMES = ["a", "b", "c"]
SIZES = {"a": 600, "b": 150, "c": 50}
ROW_TASKS = [0] * 600 + [1] * 150 + [2] * 50
LENGTHS = [10 + (r * 7) % 40 for r in range(len(ROW_TASKS))]


def data(**kw) -> DataConfig:
    return DataConfig(train="train.jsonl", **kw)


def sampler(row_tasks=ROW_TASKS, names=NAMES, seed=0, **kw):
    return make_sampler(data(**kw), row_tasks, names, seed)


def expected(strategy: str, temperature: float | None = None) -> dict[str, float]:
    """p_i from the formulas, computed here independently of the code."""
    n = [SIZES[t] for t in NAMES]
    if strategy == "size":
        w = n
    elif strategy == "equal":
        w = [1, 1, 1]
    else:
        w = [x ** (1 / temperature) for x in n]
    return {t: x / sum(w) for t, x in zip(NAMES, w)}


def test_task_shares_match_the_formulas_on_hand_values():
    # n = 100, 400: size 1/5, 4/5; equal 1/2; T = 2: sqrt(100) : sqrt(400) = 10 : 20.
    assert task_shares([100, 400], "size") == pytest.approx([0.2, 0.8])
    assert task_shares([100, 400], "equal") == pytest.approx([0.5, 0.5])
    assert task_shares([100, 400], "temperature", 2.0) == pytest.approx([1 / 3, 2 / 3])
    # The limits: T = 1 is size, T -> inf is equal.
    assert task_shares([100, 400], "temperature", 1.0) == pytest.approx([0.2, 0.8])
    assert task_shares([100, 400], "temperature", math.inf) == pytest.approx([0.5, 0.5])
    assert task_shares([100, 400], "temperature", 1e6) == pytest.approx([0.5, 0.5], abs=1e-5)
    # Large sizes with a small temperature do not overflow.
    assert task_shares([10**9, 10**9], "temperature", 0.01) == pytest.approx([0.5, 0.5])


def test_quotas_are_whole_rows_that_add_up():
    assert quotas(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3]
    assert quotas(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the two largest remainders round up
    assert quotas(800, [0.75, 0.1875, 0.0625]) == [600, 150, 50]


@pytest.mark.parametrize("strategy,temperature", [("size", None), ("equal", None), ("temperature", 2.0),
                                                  ("temperature", 5.0)])
def test_measured_task_proportions_over_an_epoch_match_p_i(strategy, temperature):
    s = sampler(mixing={"strategy": strategy, "temperature": temperature})
    assert s.rows_per_epoch == 800  # an epoch is as many rows as the data
    want = expected(strategy, temperature)
    for epoch in range(3):
        rows = [r for batch in s.plan(LENGTHS, 8, epoch, group_by_length=True) for r in batch]
        assert len(rows) == 800  # 800 is a multiple of 8: nothing dropped
        seen = Counter(NAMES[ROW_TASKS[r]] for r in rows)
        # Whole-row rounding is the only difference: within one row in 800.
        for t in NAMES:
            assert seen[t] / len(rows) == pytest.approx(want[t], abs=1 / 800 + 1e-12), (t, seen)


def test_proportions_hold_with_a_dropped_partial_batch():
    s = sampler(mixing={"strategy": "temperature", "temperature": 2.0})
    rows = [r for batch in s.plan(LENGTHS, 48, 0, group_by_length=False) for r in batch]
    assert len(rows) == 768  # 800 // 48 global batches; the last 32 rows are dropped
    seen = Counter(NAMES[ROW_TASKS[r]] for r in rows)
    for t, p in expected("temperature", 2.0).items():
        assert seen[t] / len(rows) == pytest.approx(p, abs=0.02), (t, seen)  # 32 dropped rows move a share < 0.02


def test_size_strategy_trains_every_row_once_per_epoch():
    s = sampler(mixing={"strategy": "size"})
    for epoch in range(2):
        rows = [r for batch in s.plan(LENGTHS, 8, epoch, group_by_length=True) for r in batch]
        assert sorted(rows) == list(range(800))


def test_rows_are_drawn_without_replacement_inside_a_task_and_reshuffled_when_exhausted():
    s = sampler(mixing={"strategy": "equal"})  # 267 / 267 / 266 rows per epoch
    big = [[r for r in s.epoch_rows(e) if ROW_TASKS[r] == 0] for e in range(3)]
    assert [len(x) for x in big] == [267, 267, 267]
    # 534 of task a's 600 rows over two epochs: none twice.
    assert len(set(big[0] + big[1])) == 534
    # The third epoch runs past the end of the first pass: every row has come by then.
    assert set(big[0] + big[1] + big[2]) == set(range(600))
    # The small task (50 rows, 266 a epoch) repeats; each row comes about equally often.
    small = Counter(r for e in range(3) for r in s.epoch_rows(e) if ROW_TASKS[r] == 2)
    assert set(small) == set(range(750, 800))
    assert max(small.values()) - min(small.values()) <= 2


def test_the_plan_is_a_pure_function_of_seed_and_epoch():
    one = sampler(mixing={"strategy": "temperature", "temperature": 2.0}, seed=3)
    two = sampler(mixing={"strategy": "temperature", "temperature": 2.0}, seed=3)
    # Asked in a different order (as a resumed run asks for a later epoch first): the same batches.
    later = two.plan(LENGTHS, 8, 4, True)
    assert one.plan(LENGTHS, 8, 0, True) == two.plan(LENGTHS, 8, 0, True)
    assert one.plan(LENGTHS, 8, 4, True) == later
    assert one.plan(LENGTHS, 8, 1, True) != one.plan(LENGTHS, 8, 0, True)
    other = sampler(mixing={"strategy": "temperature", "temperature": 2.0}, seed=4)
    assert other.plan(LENGTHS, 8, 0, True) != one.plan(LENGTHS, 8, 0, True)


def test_replay_takes_its_fraction_and_every_own_row_still_comes_once():
    names = ["replay", "untasked"]
    row_tasks = [1] * 600 + [0] * 1000  # 600 own rows, 1000 earlier rows to replay
    s = make_sampler(data(replay={"sources": "old.jsonl", "fraction": 0.25}), row_tasks, names, 0)
    assert s.rows_per_epoch == 800  # 600 own rows are 75% of the epoch
    for epoch in range(2):
        rows = [r for batch in s.plan([8] * 1600, 8, epoch, True) for r in batch]
        own = [r for r in rows if r < 600]
        assert sorted(own) == list(range(600))
        assert len(rows) - len(own) == 200
    # Two epochs replay 400 different earlier rows (the replay pool is not exhausted yet).
    replayed = [r for e in range(2) for r in s.epoch_rows(e) if r >= 600]
    assert len(set(replayed)) == 400


def test_replay_with_mixing_splits_the_rest_by_the_strategy():
    names = ["a", "b", REPLAY_TASK]
    row_tasks = [0] * 300 + [1] * 100 + [2] * 500
    s = make_sampler(data(mixing={"strategy": "equal"}, replay={"sources": "old.jsonl", "fraction": 0.2}),
                     row_tasks, names, 0)
    assert s.rows_per_epoch == 500  # 400 own rows / (1 - 0.2)
    seen = Counter(names[row_tasks[r]] for r in s.epoch_rows(0))
    assert seen == {"a": 200, "b": 200, REPLAY_TASK: 100}


def test_no_sampler_without_mixing_or_replay_and_clear_errors():
    assert sampler() is None
    with pytest.raises(PosttrainError, match="replay sources gave no training row"):
        make_sampler(data(replay={"sources": "old.jsonl", "fraction": 0.2}), [0, 0], ["untasked"], 0)
