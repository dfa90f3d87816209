"""Turn tokenized samples into model batches, and plan which samples form each step.

The plan works on *global* batches: the samples of one optimizer step are chosen
first (from the seed and the epoch alone), then split into micro-batches for
gradient accumulation and processes. So the same global batch is trained whatever
the split, which is what makes 4 accumulated batches of 2 equal one batch of 8,
and 2 processes equal one.
"""

from __future__ import annotations

import random

import torch

from posttrain.data.templates import IGNORE_INDEX

# Samples sorted together when grouping by length, in units of global batches:
# large enough to cut padding, small enough to keep batches random.
_MEGABATCH = 16


def epoch_plan(lengths: list[int], global_batch: int, epoch: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """The global batches of one epoch, as lists of item indices (the last partial batch is dropped)."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return batches_of(order, lengths, global_batch, rng, group_by_length)


def batches_of(order: list[int], lengths: list[int], global_batch: int, rng: random.Random,
               group_by_length: bool) -> list[list[int]]:
    """Cut an epoch's shuffled ``order`` into global batches, in a random order (a last partial batch is dropped)."""
    if group_by_length:
        mega = global_batch * _MEGABATCH
        grouped = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches


def split_global_batch(batch: list[int], lengths: list[int], n_micro: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: sorted by length so each pads little."""
    ordered = sorted(batch, key=lambda i: (-lengths[i], i))
    size = len(ordered) // (n_micro * world)
    parts = [ordered[j * size : (j + 1) * size] for j in range(n_micro * world)]
    return [parts[m * world + rank] for m in range(n_micro)]


def collate(samples: list[list[tuple]], pad_id: int) -> dict[str, torch.Tensor]:
    """Build a batch from rows, each row a list of (input_ids, labels) samples.

    Rows with one sample get an ordinary padding mask. Rows with several (packing)
    get position ids that restart per sample and no attention mask; the padding
    then forms its own segment, which nothing else attends to.

    A sample may carry a third element, its task id: the batch then also holds ``task_ids``
    (B, T), each position's task (-1 on padding), for per-task metrics. It is no model input.
    """
    packed = any(len(row) > 1 for row in samples)
    tasked = any(len(s) > 2 for row in samples for s in row)
    width = max(sum(len(s[0]) for s in row) for row in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(samples), width), dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    task_ids = torch.full((len(samples), width), -1, dtype=torch.long)
    for r, row in enumerate(samples):
        at = 0
        for ids, labs, *task in row:
            n = len(ids)
            if task:
                task_ids[r, at : at + n] = task[0]
            input_ids[r, at : at + n] = torch.as_tensor(ids)
            labels[r, at : at + n] = torch.as_tensor(labs)
            # The first token of a sample is never a target: alone, nothing precedes it.
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            attention_mask[r, at : at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention_mask
    if tasked:
        batch["task_ids"] = task_ids
    return batch


def n_targets(labels: torch.Tensor) -> int:
    """Trained tokens of a batch (labels are shifted inside the loss, the first one never counts)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
