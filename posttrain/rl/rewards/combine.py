"""A weighted sum of rewards that survives its components' failures.

Per sample, ``total = sum_i w_i * r_i``. A sample whose total cannot be trusted is
MASKED (``total`` is None, and the trainer leaves it out of the update) when any
component, for that sample:

- returns None (it cannot score it), NaN or inf, or something that is not a number;
- raises: the component's batch call failed, so it is called again one sample at a
  time and only the samples that still fail are masked;
- runs past ``timeout`` seconds: each component call runs in a worker thread, and a
  call still running at the deadline masks every sample of that call. The per-sample
  retries of a failed batch share one further ``timeout`` between them.

Python cannot stop a thread, so a timed-out call keeps running in the background
(as a daemon thread, which does not hold up the process at exit) and its result
is ignored. Nothing a sample does makes this class raise.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from dataclasses import dataclass

from posttrain.errors import PosttrainError
from posttrain.rl.rewards.base import Reward, RewardInput

MAX_ERRORS = 5
_MAX_ERROR_CHARS = 200


@dataclass
class RewardResult:
    total: list[float | None]  # None: masked
    components: dict[str, list[float | None]]  # each component's score per sample, None where it gave none
    masked: int
    errors: list[str]  # the first few distinct reasons for masked samples


class _Errors:
    def __init__(self):
        self.kept: list[str] = []

    def add(self, message: str) -> None:
        message = message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."
        if len(self.kept) < MAX_ERRORS and message not in self.kept:
            self.kept.append(message)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _call(reward: Reward, inputs: list[RewardInput], timeout: float | None):
    """("ok", scores), ("error", exception) or ("timeout", None)."""
    if timeout is None:
        try:
            return "ok", reward(list(inputs))
        except Exception as exc:  # noqa: BLE001 - a reward can raise anything; it masks samples, never the run
            return "error", exc
    box: dict = {}

    def work():
        try:
            box["ok"] = reward(list(inputs))
        except Exception as exc:  # noqa: BLE001 - as above, from the worker thread
            box["error"] = exc

    worker = threading.Thread(target=work, daemon=True, name=f"reward-{getattr(reward, 'name', '?')}")
    worker.start()
    worker.join(max(timeout, 0.0))
    if worker.is_alive():
        return "timeout", None
    if "ok" in box:
        return "ok", box["ok"]
    return "error", box.get("error", RuntimeError("the reward's thread ended without a result"))


class CombinedReward:
    def __init__(self, rewards: list, weights: list[float], timeout: float | None = None):
        if not rewards:
            raise PosttrainError("CombinedReward: give at least one reward")
        if len(weights) != len(rewards):
            raise PosttrainError(f"CombinedReward: {len(rewards)} reward(s) but {len(weights)} weight(s)")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise PosttrainError(f"CombinedReward: weight {i} must be a finite number, got {w!r}")
        for i, r in enumerate(rewards):
            if not callable(r):
                raise PosttrainError(f"CombinedReward: reward {i} ({r!r}) is not callable")
        if timeout is not None and not timeout > 0:
            raise PosttrainError(f"CombinedReward: timeout must be > 0 seconds or None, got {timeout!r}")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.timeout = timeout
        # Unique names, since they key the components and the logged metrics: regex, regex_2, ...
        self.names: list[str] = []
        for r in self.rewards:
            base = getattr(r, "name", None) or type(r).__name__
            name, k = base, 2
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
            self.names.append(name)

    def __call__(self, inputs: list[RewardInput]) -> RewardResult:
        errors = _Errors()
        components = {name: self._scores(name, reward, inputs, errors)
                      for name, reward in zip(self.names, self.rewards)}
        total: list[float | None] = []
        for i in range(len(inputs)):
            values = [components[name][i] for name in self.names]
            if any(v is None for v in values):
                total.append(None)
                continue
            value = sum(w * v for w, v in zip(self.weights, values))
            if not math.isfinite(value):
                errors.add(f"sample {i}: the weighted sum overflowed to {value}")
                value = None
            total.append(value)
        return RewardResult(total, components, sum(t is None for t in total), errors.kept)

    def _scores(self, name: str, reward: Reward, inputs: list[RewardInput], errors: _Errors) -> list[float | None]:
        n = len(inputs)
        if n == 0:
            return []
        status, value = _call(reward, inputs, self.timeout)
        if status == "ok" and not (isinstance(value, (list, tuple)) and len(value) == n):
            got = f"{len(value)} scores" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
            status, value = "error", ValueError(f"returned {got} for {n} samples")
        if status == "ok":
            return self._checked(name, reward, value, range(n), errors)
        if status == "timeout":
            errors.add(f"{name}: timed out after {self.timeout:g}s on a batch of {n}; all {n} masked")
            return [None] * n
        errors.add(f"{name}: {_describe(value)} on a batch of {n}; retrying one sample at a time")
        return self._one_by_one(name, reward, inputs, errors)

    def _one_by_one(self, name: str, reward: Reward, inputs: list[RewardInput], errors: _Errors):
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        scores: list[float | None] = []
        for i, x in enumerate(inputs):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                errors.add(f"{name}: out of time retrying; samples {i}..{len(inputs) - 1} masked")
                return scores + [None] * (len(inputs) - i)
            status, value = _call(reward, [x], left)
            if status == "ok" and isinstance(value, (list, tuple)) and len(value) == 1:
                scores += self._checked(name, reward, value, [i], errors)
            elif status == "timeout":
                errors.add(f"{name}: sample {i} timed out")
                scores.append(None)
            else:
                reason = _describe(value) if status == "error" else f"returned {value!r} for one sample"
                errors.add(f"{name}: sample {i}: {reason}")
                scores.append(None)
        return scores

    @staticmethod
    def _checked(name: str, reward: Reward, values, indices, errors: _Errors) -> list[float | None]:
        for message in getattr(reward, "last_errors", None) or ():
            errors.add(f"{name}: {message}")
        out: list[float | None] = []
        for i, v in zip(indices, values):
            if v is None:
                out.append(None)
            elif isinstance(v, numbers.Real) and math.isfinite(v):
                out.append(float(v))
            else:
                errors.add(f"{name}: sample {i} scored {v!r}, not a finite number")
                out.append(None)
        return out
