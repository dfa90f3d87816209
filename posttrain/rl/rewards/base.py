"""What every reward sees and returns.

A reward is any object with a ``name`` and a batched ``__call__(inputs) -> scores``: one
float per input, or ``None`` where it cannot score that sample (no reference, an
unparsable judge reply). ``CombinedReward`` masks such samples out of the update
instead of inventing a score for them. A reward may also keep ``last_errors`` (a list
of short strings) saying why its last call gave None where it did; ``CombinedReward``
reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class RewardInput:
    prompt: list[dict]  # OpenAI-style messages {role, content}, without the completion
    completion: str
    reference: str | None = None  # the known answer, for verifiable tasks
    metadata: dict = field(default_factory=dict)  # anything else the data row carried (task, id, ...)


class Reward(Protocol):
    name: str

    def __call__(self, inputs: list[RewardInput]) -> list[float | None]: ...


class SampleReward:
    """A reward computed one sample at a time; subclasses implement ``score``."""

    name = "reward"

    def score(self, x: RewardInput) -> float | None:
        raise NotImplementedError

    def __call__(self, inputs: list[RewardInput]) -> list[float | None]:
        return [self.score(x) for x in inputs]
