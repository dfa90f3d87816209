"""Packing into rows, collating rows into batches, and planning global batches."""

import random

import pytest
import torch

from posttrain.data.collate import collate, epoch_plan, n_targets, split_global_batch
from posttrain.data.packing import pack_best_fit
from posttrain.data.templates import IGNORE_INDEX

PAD = 0


# --- pack_best_fit -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pack_best_fit_places_every_index_once_within_max_len(seed):
    rng = random.Random(seed)
    max_len = 64
    lengths = [rng.randint(1, max_len) for _ in range(200)]
    bins = pack_best_fit(lengths, max_len)
    placed = [i for b in bins for i in b]
    assert sorted(placed) == list(range(len(lengths)))
    assert all(b for b in bins)
    for b in bins:
        assert sum(lengths[i] for i in b) <= max_len
    # Best fit decreasing never needs more than 11/9 OPT + 1 bins; OPT >= total / max_len.
    assert len(bins) <= 11 / 9 * (sum(lengths) / max_len) + 2


def test_pack_best_fit_finds_the_tight_packing():
    # 5+3 and 6+2 fill two rows exactly; first-fit in given order would need three.
    lengths = [5, 6, 3, 2]
    bins = pack_best_fit(lengths, 8)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[2, 6], [3, 5]]


def reference_best_fit(lengths, max_len):
    """Plain best-fit decreasing: each sample, longest first, into the fullest row it fits."""
    bins, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
            bins[b].append(i)
            rooms[b] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(max_len - lengths[i])
    return bins


def test_pack_best_fit_uses_the_tightest_row():
    # When the 1 comes, row 0 (7) has room 3 and row 1 (4 + 4) room 2: best fit takes
    # row 1, first fit would take row 0.
    assert pack_best_fit([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_pack_best_fit_matches_a_plain_best_fit(seed):
    rng = random.Random(100 + seed)
    lengths = [rng.randint(1, 40) for _ in range(150)]
    assert pack_best_fit(lengths, 40) == reference_best_fit(lengths, 40)


def test_pack_best_fit_full_length_sample_gets_its_own_row():
    bins = pack_best_fit([8, 1, 8], 8)
    assert sorted(sorted(b) for b in bins) == [[0], [1], [2]]


def test_pack_best_fit_rejects_a_sample_longer_than_max_len():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_best_fit([3, 9, 2], 8)


# --- collate -------------------------------------------------------------------------------


def sample(start: int, n: int, trained_from: int = 0):
    ids = list(range(start, start + n))
    labels = [IGNORE_INDEX] * trained_from + ids[trained_from:]
    return ids, labels


def test_collate_pads_single_sample_rows():
    a, b = sample(10, 5), sample(20, 3, trained_from=1)
    batch = collate([[a], [b]], PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 11, 12, 13, 14],
        [IGNORE_INDEX, 21, 22, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4]
    assert batch["position_ids"][1, :3].tolist() == [0, 1, 2]
    for key in ("input_ids", "labels", "position_ids", "attention_mask"):
        assert batch[key].dtype == torch.long


def test_collate_packed_rows_restart_positions_and_mask_sample_starts():
    row0 = [sample(10, 3), sample(20, 4, trained_from=2)]  # 7 tokens
    row1 = [sample(30, 2), sample(40, 2)]  # 4 tokens, 3 of padding
    batch = collate([row0, row1], PAD)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 20, 21, 22, 23],
        [30, 31, 40, 41, PAD, PAD, PAD],
    ]
    # Positions restart at each sample, and the padding forms a segment of its own.
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 0, 1, 2, 3],
        [0, 1, 0, 1, 0, 1, 2],
    ]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX, 22, 23],
        [IGNORE_INDEX, 31, IGNORE_INDEX, 41, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]


def test_collate_first_token_of_each_packed_sample_is_never_a_target():
    rng = random.Random(0)
    rows = [[sample(100 * r + 10 * k, rng.randint(1, 6)) for k in range(rng.randint(2, 4))] for r in range(5)]
    batch = collate(rows, PAD)
    for r, row in enumerate(rows):
        at = 0
        for ids, _ in row:
            assert batch["labels"][r, at] == IGNORE_INDEX
            assert batch["position_ids"][r, at] == 0
            assert batch["labels"][r, at + 1 : at + len(ids)].tolist() == ids[1:]
            at += len(ids)
        assert (batch["labels"][r, at:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][r, at:] == PAD).all()


def test_n_targets_counts_shifted_trained_labels():
    a = sample(10, 5)  # 4 targets (first token masked by collate)
    b = sample(20, 4, trained_from=2)  # 2 targets
    c = sample(30, 3, trained_from=3)  # none
    assert n_targets(collate([[a], [b], [c]], PAD)["labels"]) == 6
    assert n_targets(collate([[a, b], [c]], PAD)["labels"]) == 6
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 8, IGNORE_INDEX]])
    assert n_targets(labels) == 3  # column 0 is never a target


# --- epoch_plan and split_global_batch -----------------------------------------------------


LENGTHS = [random.Random(1).randint(1, 50) for _ in range(103)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_epoch_plan_is_deterministic_per_seed_and_epoch(group_by_length):
    plan = epoch_plan(LENGTHS, 8, epoch=0, seed=7, group_by_length=group_by_length)
    assert plan == epoch_plan(LENGTHS, 8, epoch=0, seed=7, group_by_length=group_by_length)
    assert plan != epoch_plan(LENGTHS, 8, epoch=1, seed=7, group_by_length=group_by_length)
    assert plan != epoch_plan(LENGTHS, 8, epoch=0, seed=8, group_by_length=group_by_length)


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("global_batch", [1, 8, 10, 103])
def test_epoch_plan_drops_only_the_last_partial_batch(group_by_length, global_batch):
    plan = epoch_plan(LENGTHS, global_batch, epoch=3, seed=0, group_by_length=group_by_length)
    assert len(plan) == len(LENGTHS) // global_batch
    assert all(len(b) == global_batch for b in plan)
    used = [i for b in plan for i in b]
    assert len(used) == len(set(used))  # each index at most once per epoch
    assert len(set(range(len(LENGTHS))) - set(used)) == len(LENGTHS) % global_batch


def test_epoch_plan_shuffles():
    plan = epoch_plan(LENGTHS, 8, epoch=0, seed=0, group_by_length=False)
    assert [i for b in plan for i in b] != list(range(len(plan) * 8))


def test_epoch_plan_groups_by_length_within_a_batch():
    # With grouping, a batch's samples are neighbours in length order of their megabatch,
    # so batches are far more uniform than random ones.
    lengths = list(range(1, 257))
    grouped = epoch_plan(lengths, 8, epoch=0, seed=0, group_by_length=True)
    plain = epoch_plan(lengths, 8, epoch=0, seed=0, group_by_length=False)

    def spread(plan):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan)

    assert spread(grouped) < spread(plain) / 4


@pytest.mark.parametrize(("n_micro", "world"), [(4, 1), (2, 2), (1, 4)])
def test_split_global_batch_covers_the_global_batch_exactly(n_micro, world):
    global_batch = epoch_plan(LENGTHS, 8, epoch=0, seed=0, group_by_length=True)[0]
    parts = [split_global_batch(global_batch, LENGTHS, n_micro, world, rank) for rank in range(world)]
    assert all(len(p) == n_micro for p in parts)
    micro = [m for p in parts for m in p]
    assert len(micro) == n_micro * world
    assert all(len(m) == 8 // (n_micro * world) for m in micro)
    flat = [i for m in micro for i in m]
    assert sorted(flat) == sorted(global_batch)  # every sample once, none lost, none repeated


def test_split_global_batch_is_the_same_whatever_the_split():
    global_batch = epoch_plan(LENGTHS, 8, epoch=2, seed=5, group_by_length=False)[0]
    seen = set()
    for n_micro, world in [(4, 1), (2, 2), (1, 4), (8, 1), (1, 1)]:
        parts = [split_global_batch(global_batch, LENGTHS, n_micro, world, rank) for rank in range(world)]
        seen.add(frozenset(i for p in parts for m in p for i in m))
    assert seen == {frozenset(global_batch)}
