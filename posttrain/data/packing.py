"""Pack several samples into one row of at most ``max_len`` tokens.

Packed samples never see each other: the collator restarts position ids at each
sample, and transformers turns restarting position ids (with no 2D attention
mask) into a block-diagonal causal mask, or varlen flash attention on GPU.
That detection is skipped when the forward pass builds a KV cache, so every
training forward must pass ``use_cache=False`` (tests/invariants/test_packing.py).
"""

from __future__ import annotations

import bisect


def pack_best_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: few, full rows. Returns sample indices per row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining capacity, bin index), kept sorted so the tightest fitting bin is found by bisect.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than max_len={max_len}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            room, b = free.pop(pos)
            bins[b].append(i)
            room -= n
        else:
            b = len(bins)
            bins.append([i])
            room = max_len - n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins
