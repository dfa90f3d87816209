"""Rewards for online RL, and building them from config.

``build_rewards(specs)`` turns a list of config dicts into one ``CombinedReward``::

    - {type: numeric_match, tolerance: 0.01}
    - {type: length_penalty, max_chars: 200, weight: 0.5}
    - {type: judge, base_url: http://localhost:8000/v1, model: judge, rubric: "...", api_key_env: OPENAI_API_KEY}

Every spec has a ``type`` and may carry ``weight`` (default 1.0) and ``name`` (the key of its
scores in the metrics; default the type's own name).
"""

from __future__ import annotations

import math
import numbers
import os

from posttrain.errors import PosttrainError
from posttrain.rl.rewards.base import Reward, RewardInput, SampleReward
from posttrain.rl.rewards.combine import CombinedReward, RewardResult
from posttrain.rl.rewards.judge import (
    JudgeClient,
    JudgeError,
    JudgeReward,
    LocalJudge,
    PairwiseJudge,
)
from posttrain.rl.rewards.python_fn import PythonReward
from posttrain.rl.rewards.reward_model import RewardModelReward
from posttrain.rl.rewards.rules import (
    ExactMatch,
    LengthPenalty,
    NumericMatch,
    RegexReward,
    extract_number,
)

__all__ = [
    "CombinedReward", "ExactMatch", "JudgeClient", "JudgeError", "JudgeReward", "LengthPenalty", "LocalJudge",
    "NumericMatch", "PairwiseJudge", "PythonReward", "RegexReward", "Reward", "RewardInput", "RewardModelReward",
    "RewardResult", "SampleReward", "build_reward", "build_rewards", "extract_number", "pairwise_judge",
]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_TEXT = (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
_NUMBER = (_is_number, "a number")
_NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "a number > 0")
_COUNT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_POSITIVE_COUNT = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_SCALE = (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v)) and v[0] < v[1],
          "a pair [low, high] of numbers with low < high")

_COMMON = {"weight": _NUMBER, "name": _TEXT}


def _length_penalty(max_chars=None, max_tokens=None, per_unit=0.01, tokenizer=None):
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"field 'tokenizer': cannot load a tokenizer from {tokenizer!r}: {exc}") from None
    return LengthPenalty(max_chars=max_chars, max_tokens=max_tokens, per_unit=per_unit, tokenizer=tokenizer)


def _judge(base_url, model, rubric, api_key_env=None, scale=(1, 10), timeout=30, max_retries=2, max_concurrency=8):
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise PosttrainError(f"field 'api_key_env': the environment variable {api_key_env} is not set")
    client = JudgeClient(base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries)
    return JudgeReward(client, rubric, scale=tuple(scale), max_concurrency=max_concurrency)


def _local_judge(path, rubric, scale=(1, 10), max_new_tokens=16, device=None):
    return JudgeReward(LocalJudge(path, max_new_tokens=max_new_tokens, device=device), rubric, scale=tuple(scale),
                       max_concurrency=1)


# type -> (builder, its fields, the required ones)
_TYPES: dict[str, tuple] = {
    "exact_match": (ExactMatch, {"strip": _BOOL, "case_sensitive": _BOOL}, ()),
    "numeric_match": (NumericMatch, {"tolerance": _NON_NEGATIVE}, ()),
    "regex": (RegexReward, {"pattern": _TEXT, "must_match": _BOOL, "score": _NUMBER}, ("pattern",)),
    "length_penalty": (_length_penalty, {"max_chars": _COUNT, "max_tokens": _COUNT, "per_unit": _NON_NEGATIVE,
                                         "tokenizer": _TEXT}, ()),
    "reward_model": (RewardModelReward, {"path": _TEXT, "batch_size": _POSITIVE_COUNT, "device": _TEXT}, ("path",)),
    "judge": (_judge, {"base_url": _TEXT, "model": _TEXT, "rubric": _TEXT, "api_key_env": _TEXT, "scale": _SCALE,
                       "timeout": _POSITIVE, "max_retries": _COUNT, "max_concurrency": _POSITIVE_COUNT},
              ("base_url", "model", "rubric")),
    "local_judge": (_local_judge, {"path": _TEXT, "rubric": _TEXT, "scale": _SCALE, "max_new_tokens": _POSITIVE_COUNT,
                                   "device": _TEXT}, ("path", "rubric")),
    "python": (lambda function: PythonReward(function), {"function": _TEXT}, ("function",)),
}
_ALLOWED_TYPES = ", ".join(_TYPES)


def build_reward(spec: dict, index: int | None = None):
    """One reward from its config dict; errors name ``rewards[index]``, the field and what is allowed."""
    where = "reward" if index is None else f"rewards[{index}]"
    if not isinstance(spec, dict):
        raise PosttrainError(f"{where}: expected a mapping such as {{type: exact_match}}, got {spec!r}")
    kind = spec.get("type")
    if kind is None:
        raise PosttrainError(f"{where}: field 'type' is missing; allowed: {_ALLOWED_TYPES}")
    if kind not in _TYPES:
        raise PosttrainError(f"{where}: field 'type' is {kind!r}; allowed: {_ALLOWED_TYPES}")
    builder, fields, required = _TYPES[kind]
    where = f"{where} (type {kind})"
    checks = {**fields, **_COMMON}
    for field, value in spec.items():
        if field == "type":
            continue
        if field not in checks:
            raise PosttrainError(f"{where}: unknown field {field!r}; allowed: {', '.join(['type', *checks])}")
        ok, expected = checks[field]
        if not ok(value):
            raise PosttrainError(f"{where}: field {field!r} is {value!r}; expected {expected}")
    for field in required:
        if field not in spec:
            raise PosttrainError(f"{where}: field {field!r} is required ({fields[field][1]})")
    try:
        reward = builder(**{k: v for k, v in spec.items() if k in fields})
    except PosttrainError as exc:
        raise PosttrainError(f"{where}: {exc}") from None
    if "name" in spec:
        reward.name = spec["name"]
    return reward


def pairwise_judge(spec: dict, where: str) -> PairwiseJudge:
    """A pairwise LLM judge from ``{base_url, model, rubric, api_key_env, ...}``, checked like a judge reward."""
    spec = {"rubric": "Which response answers the question correctly and helpfully?", **spec, "type": "judge"}
    try:
        client = build_reward(spec).client
    except PosttrainError as exc:
        raise PosttrainError(f"{where}: {exc}") from None
    return PairwiseJudge(client, spec["rubric"])


def build_rewards(specs: list[dict], timeout: float | None = None) -> CombinedReward:
    """All rewards of a config as one ``CombinedReward``, each weighted by its spec's ``weight`` (default 1.0)."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise PosttrainError(f"rewards: expected a non-empty list of reward specs, got {specs!r}; "
                             f"e.g. [{{type: exact_match}}]. Allowed types: {_ALLOWED_TYPES}")
    rewards = [build_reward(spec, i) for i, spec in enumerate(specs)]
    weights = [float(spec.get("weight", 1.0)) for spec in specs]
    return CombinedReward(rewards, weights, timeout=timeout)
