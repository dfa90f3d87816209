"""A trained reward model (``posttrain`` reward-model output) as an RL reward."""

from __future__ import annotations

from pathlib import Path

from posttrain.eval.reward_score import RewardScorer
from posttrain.rl.rewards.base import RewardInput


class RewardModelReward:
    """The reward model's score of the prompt followed by the completion as the assistant's turn.

    A conversation the model cannot score (longer than its context, a chat-template error)
    gets None, with the reason in ``last_errors``, and the rest of the batch is scored.
    """

    name = "reward_model"

    def __init__(self, path: str | Path, batch_size: int = 16, device: str | None = None):
        self.scorer = RewardScorer(path, batch_size=batch_size, device=device)
        self.last_errors: list[str] = []

    def __call__(self, inputs: list[RewardInput]) -> list[float | None]:
        conversations = [list(x.prompt) + [{"role": "assistant", "content": x.completion}] for x in inputs]
        problems = [self.scorer.check(c) for c in conversations]
        self.last_errors = [f"sample {i}: {p}" for i, p in enumerate(problems) if p]
        usable = [i for i, p in enumerate(problems) if p is None]
        scores: list[float | None] = [None] * len(inputs)
        for i, score in zip(usable, self.scorer.score([conversations[i] for i in usable])):
            scores[i] = score
        return scores
