"""What every generation engine takes and returns.

The online trainers (PPO, GRPO, RFT, online DPO) sample completions through an
engine, then recompute the policy's log-probs of the same tokens with a
teacher-forced forward pass. The engine's log-probs are therefore defined
exactly (see ``Generation``) so that the trainer can log how far the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How to sample: ``n`` completions per prompt of at most ``max_new_tokens`` tokens each.

    ``temperature == 0`` means greedy decoding (``top_p`` is then unused). With
    ``seed`` set, the same call gives the same samples and leaves the global RNG as it was.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1; got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One completion of prompt number ``prompt_index``.

    ``completion_ids``: the sampled tokens, ending with the stop token when generation
    stopped on one (so that training can learn to stop); nothing after it.

    ``logprobs[i]``: ``log_softmax(logits_i / T)[completion_ids[i]]`` where ``logits_i`` are the
    model's raw logits at that step and ``T`` is the sampling temperature (``T = 1`` when
    greedy). This is the sampling distribution *before* top-p truncation: a token's log-prob
    does not depend on ``top_p``. A trainer that recomputes ``log_softmax(logits / T)`` of the
    same tokens by a teacher-forced forward pass should find the same values up to numerics.

    ``text``: the completion decoded without the stop token and special tokens.

    ``finish_reason``: ``"stop"`` when a stop token ended the completion, ``"length"`` when
    ``max_new_tokens`` did.
    """

    prompt_index: int
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
