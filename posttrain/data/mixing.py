"""Share each epoch's rows among tasks (``data.mixing``) and earlier data (``data.replay``).

With n_i the training rows of task i of the stage's own data (packed rows when packing), a strategy
gives each task a share p_i:

- ``size``: p_i = n_i / sum_j n_j (natural proportions);
- ``equal``: p_i = 1 / K for K tasks;
- ``temperature`` T: p_i = n_i^(1/T) / sum_j n_j^(1/T) (T = 1 is size; T -> inf tends to equal).

Replay data takes a fixed share f (``data.replay.fraction``) and the stage's own tasks share the rest,
by the strategy, or all together as one group without ``data.mixing`` (every own row once per epoch).

An epoch is N rows: the training rows without replay; with replay N = round(n_own / (1 - f)), so an
epoch trains as many of the stage's own rows as its data holds, plus the replayed ones. Group g gets
m_g = N * share_g rows (largest-remainder rounding, so the m_g add up to N exactly), taken from an endless
stream of its rows: pass k over them is a permutation seeded by (seed, group, k) and epoch e takes stream
positions [e * m_g, (e + 1) * m_g). Rows are thus drawn without replacement inside a task until it is
exhausted, then reshuffled; and the plan stays a pure function of (seed, epoch), as ``epoch_plan``'s is,
so resume and data parallelism need no sampler state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from posttrain.config import DataConfig
from posttrain.data.collate import batches_of
from posttrain.errors import PosttrainError

REPLAY_TASK = "replay"
# The group of the stage's own rows when they are not mixed by task (replay without data.mixing).
_OWN = "\0own"


def task_shares(sizes: list[int], strategy: str, temperature: float | None = None) -> list[float]:
    """p_i for tasks of ``sizes`` rows under a mixing strategy (every size > 0)."""
    if strategy == "equal" or (strategy == "temperature" and math.isinf(temperature)):
        return [1.0 / len(sizes)] * len(sizes)
    power = 1.0 if strategy == "size" else 1.0 / temperature
    # Relative to the largest task, so n^(1/T) cannot overflow whatever T is.
    top = max(sizes)
    weights = [(n / top) ** power for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


def quotas(total: int, shares: list[float]) -> list[int]:
    """Whole row counts proportional to ``shares`` that add up to ``total`` (largest remainder)."""
    exact = [total * s / sum(shares) for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class TaskSampler:
    """Which rows form each epoch: ``groups`` maps a group name to its rows and its count per epoch."""

    seed: int
    groups: dict[str, tuple[list[int], int]]
    shares: dict[str, float]
    _cached: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    @property
    def rows_per_epoch(self) -> int:
        return sum(count for _, count in self.groups.values())

    def epoch_rows(self, epoch: int) -> list[int]:
        """The rows of one epoch (a row may come more than once), grouped by task, not yet shuffled."""
        out = []
        for name, (rows, count) in self.groups.items():
            start, n = epoch * count, len(rows)
            for k in range(start // n, (start + count - 1) // n + 1):
                perm = list(rows)
                random.Random(f"{self.seed}-mix-{name}-{k}").shuffle(perm)
                lo, hi = max(start - k * n, 0), min(start + count - k * n, n)
                out.extend(perm[lo:hi])
        return out

    def plan(self, lengths: list[int], global_batch: int, epoch: int, group_by_length: bool) -> list[list[int]]:
        """The global batches of one epoch, like ``collate.epoch_plan`` but over the mixed rows."""
        if self._cached is None or self._cached[0] != epoch:
            order = self.epoch_rows(epoch)
            rng = random.Random(f"{self.seed}-{epoch}")
            rng.shuffle(order)
            self._cached = (epoch, batches_of(order, lengths, global_batch, rng, group_by_length))
        return self._cached[1]

    def describe(self) -> str:
        parts = [f"{'own data' if name == _OWN else name} {self.shares[name]:.3f} ({count} of {len(rows)} rows)"
                 for name, (rows, count) in self.groups.items()]
        return f"rows per epoch: {self.rows_per_epoch}; share (rows per epoch of rows): " + ", ".join(parts)


def make_sampler(cfg: DataConfig, row_tasks: list[int], task_names: list[str], seed: int) -> TaskSampler | None:
    """The sampler for ``data.mixing`` / ``data.replay``, or None when every row is simply trained once per epoch.

    ``row_tasks`` is each training row's task id, an index into ``task_names``.
    """
    if cfg.mixing is None and cfg.replay is None:
        return None
    by_task: dict[str, list[int]] = {}
    for r, t in enumerate(row_tasks):
        by_task.setdefault(task_names[t], []).append(r)
    replay_rows = by_task.pop(REPLAY_TASK, []) if cfg.replay is not None else []
    if cfg.replay is not None and not replay_rows:
        raise PosttrainError("data.replay: the replay sources gave no training row; check their files")
    if not by_task:
        raise PosttrainError("no training rows of the stage's own data (data.train) remain")
    if cfg.mixing is not None:
        names = sorted(by_task)
        shares = dict(zip(names, task_shares([len(by_task[n]) for n in names], cfg.mixing.strategy,
                                             cfg.mixing.temperature)))
        own = {n: by_task[n] for n in names}
    else:
        own = {_OWN: [r for rows in by_task.values() for r in rows]}
        shares = {_OWN: 1.0}
    n_own = sum(len(rows) for rows in own.values())
    if cfg.replay is None:
        total = n_own
    else:
        f = cfg.replay.fraction
        shares = {name: (1.0 - f) * s for name, s in shares.items()}
        shares[REPLAY_TASK] = f
        own[REPLAY_TASK] = replay_rows
        total = round(n_own / (1.0 - f))
    counts = quotas(total, list(shares.values()))
    groups = {name: (sorted(own[name]), count) for name, count in zip(shares, counts) if count > 0}
    return TaskSampler(seed, groups, shares)
