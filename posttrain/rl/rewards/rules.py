"""Rule-based rewards for verifiable answers: exact match, numeric match, regex, length."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from posttrain.errors import PosttrainError
from posttrain.rl.rewards.base import RewardInput, SampleReward


class ExactMatch(SampleReward):
    """1.0 when the completion equals the reference, else 0.0; None without a reference."""

    name = "exact_match"

    def __init__(self, strip: bool = True, case_sensitive: bool = True):
        self.strip = strip
        self.case_sensitive = case_sensitive

    def _norm(self, text: str) -> str:
        if self.strip:
            text = text.strip()
        return text if self.case_sensitive else text.casefold()

    def score(self, x: RewardInput) -> float | None:
        if x.reference is None:
            return None
        return 1.0 if self._norm(x.completion) == self._norm(x.reference) else 0.0


# A sign only counts when it does not follow a word character, so "5-3" reads as 5 and 3,
# not 5 and -3. Thousands groups must be whole ("1,2345" is 1 and 2345, not 1,234 and 5).
_NUMBER = re.compile(
    r"(?:(?<!\w)[-+\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|(?:(?<!\w)[-+\u2212])?\.\d+"
)
_BOXED = "\\boxed{"


def _boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces inside it balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return text[begin:]  # an unclosed box still holds the answer the model meant to give


def extract_number(text: str) -> Decimal | None:
    """The answer's number: the last number inside the last ``\\boxed{}`` if there is one, else the
    last number in the text. Handles signs, decimals and thousands separators ("1,234.5");
    not fractions or scientific notation."""
    boxed = _boxed_content(text)
    matches = _NUMBER.findall(boxed if boxed is not None else text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "").replace("\u2212", "-")
    try:
        return Decimal(raw)
    except InvalidOperation:
        return None


class NumericMatch(SampleReward):
    """1.0 when the completion's number is within ``tolerance`` (absolute) of the reference's number.

    0.0 when the completion holds no number; None without a reference or when the reference
    itself holds no number. Decimals are compared exactly, so large integers do not round.
    """

    name = "numeric_match"

    def __init__(self, tolerance: float = 1e-6):
        if tolerance < 0:
            raise PosttrainError(f"NumericMatch: tolerance must be >= 0, got {tolerance}")
        self.tolerance = Decimal(str(tolerance))

    def score(self, x: RewardInput) -> float | None:
        if x.reference is None:
            return None
        expected = extract_number(x.reference)
        if expected is None:
            return None
        got = extract_number(x.completion)
        return 1.0 if got is not None and abs(got - expected) <= self.tolerance else 0.0


class RegexReward(SampleReward):
    """``score`` when ``re.search(pattern)`` finds a match (or, with ``must_match=False``, finds none); else 0."""

    name = "regex"

    def __init__(self, pattern: str, must_match: bool = True, score: float = 1.0):
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise PosttrainError(f"RegexReward: pattern {pattern!r} is not a valid regular expression: {exc}") from None
        self.must_match = must_match
        self.value = float(score)

    def score(self, x: RewardInput) -> float | None:
        found = self.pattern.search(x.completion) is not None
        return self.value if found == self.must_match else 0.0


class LengthPenalty(SampleReward):
    """``-per_unit`` for every unit over the limit, else 0.

    Exactly one limit: ``max_chars`` (characters) or ``max_tokens`` (tokens of ``tokenizer``
    when given, else whitespace-separated words).
    """

    name = "length_penalty"

    def __init__(self, max_chars: int | None = None, max_tokens: int | None = None, per_unit: float = 0.01,
                 tokenizer=None):
        if (max_chars is None) == (max_tokens is None):
            raise PosttrainError("LengthPenalty: give exactly one of max_chars or max_tokens")
        limit = max_chars if max_chars is not None else max_tokens
        if limit < 0:
            raise PosttrainError(f"LengthPenalty: the limit must be >= 0, got {limit}")
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self.per_unit = per_unit
        self.tokenizer = tokenizer

    def _length(self, text: str) -> int:
        if self.max_chars is not None:
            return len(text)
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return len(text.split())

    def score(self, x: RewardInput) -> float | None:
        limit = self.max_chars if self.max_chars is not None else self.max_tokens
        over = self._length(x.completion) - limit
        return -self.per_unit * over if over > 0 else 0.0
