"""Duplicates and train/eval contamination, by normalised text and word n-grams.

A row's text is every string it holds in the fields of our formats (messages' contents, prompt,
instruction, input, output, text, chosen, rejected, completion, response), joined in that order.
Normalisation lowercases and keeps runs of letters and digits as words, so "What is 2+3?" and
"what is 2 + 3" are the same text.

- Duplicates: rows whose normalised text equals an earlier row's (the first is kept).
- Contamination: an eval row is contaminated when at least ``threshold`` of its word n-grams
  occur in the training rows. An eval row shorter than n words is contaminated when its whole
  text occurs inside a training row (e.g. an eval prompt that some training row contains).
  n = 8 follows the common practice of the GPT-3 / PaLM contamination studies for prose; short
  synthetic prompts are caught through the whole-text rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import DataError, PosttrainError

_FIELDS = ("messages", "conversations", "prompt", "instruction", "input", "output", "text", "chosen", "rejected",
           "completion", "response")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def read_rows(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file; a line that is not one is a clear error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise PosttrainError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}, line {i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def row_text(row: dict) -> str:
    parts: list[str] = []
    for key in _FIELDS:
        value = row.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):  # messages / conversations, or a preference side given as messages
            for msg in value:
                if isinstance(msg, dict):
                    content = msg.get("content", msg.get("value"))
                    if isinstance(content, str):
                        parts.append(content)
    return "\n".join(parts)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    if not w:
        return set()
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


@dataclass
class Contamination:
    n: int
    threshold: float
    eval_rows: int = 0
    train_rows: int = 0
    contaminated: list[dict] = field(default_factory=list)  # {file, row, overlap, exact, text}

    @property
    def rate(self) -> float:
        return len(self.contaminated) / self.eval_rows if self.eval_rows else 0.0

    def format(self, examples: int = 5) -> str:
        exact = sum(c["exact"] for c in self.contaminated)
        lines = [f"contamination check ({self.n}-grams, flagged at >= {self.threshold:.0%} overlap): "
                 f"{len(self.contaminated)} of {self.eval_rows} eval rows ({self.rate:.1%}) overlap the "
                 f"{self.train_rows} training rows; {exact} are exact duplicates"]
        for c in self.contaminated[:examples]:
            text = c["text"].replace("\n", " | ")
            lines.append(f"  {c['file']} row {c['row']}: {c['overlap']:.0%} overlap"
                         f"{' (exact)' if c['exact'] else ''}: {text[:100]}")
        if len(self.contaminated) > examples:
            lines.append(f"  ... and {len(self.contaminated) - examples} more (--out writes them all)")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"n": self.n, "threshold": self.threshold, "eval_rows": self.eval_rows,
                           "train_rows": self.train_rows, "rate": self.rate, "contaminated": self.contaminated},
                          indent=2, ensure_ascii=False)


def contamination(train_files: list[str | Path], eval_files: list[str | Path], *, n: int = 8,
                  threshold: float = 0.5) -> Contamination:
    """Which eval rows overlap the training rows (see the module docstring)."""
    if n < 1:
        raise PosttrainError(f"n must be at least 1; got {n}")
    if not 0 < threshold <= 1:
        raise PosttrainError(f"threshold must be in (0, 1]; got {threshold}")
    train_words: list[list[str]] = []
    result = Contamination(n, threshold)
    for path in train_files:
        for row in read_rows(path):
            train_words.append(words(row_text(row)))
            result.train_rows += 1
    texts = {" ".join(w) for w in train_words}
    by_k: dict[int, set[tuple[str, ...]]] = {}

    def seen(k: int) -> set[tuple[str, ...]]:
        # Every k-gram of the training rows; a short eval row (k < n words) is looked up whole among them.
        if k not in by_k:
            by_k[k] = {tuple(w[i:i + k]) for w in train_words for i in range(len(w) - k + 1)}
        return by_k[k]

    for path in eval_files:
        for i, row in enumerate(read_rows(path), 1):
            result.eval_rows += 1
            text = row_text(row)
            grams = ngrams(text, n)
            if not grams:
                continue
            overlap = len(grams & seen(min(n, len(next(iter(grams)))))) / len(grams)
            exact = " ".join(words(text)) in texts
            if exact or overlap >= threshold:
                result.contaminated.append({"file": str(path), "row": i, "overlap": round(overlap, 4),
                                            "exact": exact, "text": text})
    return result


def deduplicate(rows: list[dict]) -> tuple[list[dict], list[tuple[int, int]]]:
    """(rows without normalised-text duplicates, [(row number dropped, row number it repeats)]), 1-based."""
    first: dict[str, int] = {}
    kept, dropped = [], []
    for i, row in enumerate(rows, 1):
        key = " ".join(words(row_text(row)))
        if key in first:
            dropped.append((i, first[key]))
            continue
        first[key] = i
        kept.append(row)
    return kept, dropped


__all__ = ["Contamination", "contamination", "deduplicate", "ngrams", "read_rows", "row_text", "words"]
