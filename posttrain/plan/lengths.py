"""Token lengths of a data file, through posttrain's own loading, validation and chat rendering.

A row's length is that of the longest sequence a training step would see for it: the whole rendered
conversation (``messages``, ``alpaca``, ``multitask``), the text (``text``, before it is cut into
``max_seq_len`` chunks), the longer of chosen and rejected with their prompt (``preference``), prompt and
completion (``feedback``), or the prompt with the generation prompt (``prompt``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from posttrain.data.formats import FORMATS
from posttrain.errors import PosttrainError

# Sequence lengths are suggested in multiples of this (kernels and the allocator like round sizes).
SEQ_LEN_STEP = 64


@dataclass(frozen=True)
class LengthStats:
    path: str
    format: str
    rows: int
    dropped: int
    min: int
    p50: int
    p90: int
    p99: int
    max: int
    mean: float
    suggested_seq_len: int  # the 99th percentile rounded up to a multiple of 64 (capped by the model)
    seq_len: int  # the length planned for: --seq-len, else the suggested one
    longer: int  # rows longer than seq_len: a run truncates them (or drops them, with data.overlong: drop)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_format(path: str) -> str:
    """The format of a data file from its first readable row's keys."""
    from posttrain.data.loading import read_rows
    from posttrain.data.report import RowIssue

    for _, row in read_rows(path):
        if isinstance(row, RowIssue) or not isinstance(row, dict):
            continue
        keys = set(row)
        for fmt, needed in (("preference", {"chosen", "rejected"}), ("feedback", {"completion", "label"}),
                            ("messages", {"messages"}), ("messages", {"conversations"}), ("alpaca", {"instruction"}),
                            ("multitask", {"task", "input", "output"}), ("text", {"text"}), ("prompt", {"prompt"})):
            if needed <= keys:
                return fmt
        raise PosttrainError(f"--data {path}: cannot tell the format from the first row's keys {sorted(keys)}; "
                             f"pass --data-format ({', '.join(FORMATS)})")
    raise PosttrainError(f"--data {path}: no readable row")


def token_lengths(path: str, fmt: str, tokenizer) -> tuple[list[int], int]:
    """(the token length of every usable row, the number of rows dropped by validation or rendering)."""
    from posttrain.data.preference import (
        FeedbackExample,
        PreferenceExample,
        PromptExample,
    )
    from posttrain.data.templates import ChatEncoder, resolve_chat_template
    from posttrain.data.validate import load_examples

    if fmt != "text":
        resolve_chat_template(tokenizer, None)
    examples, report = load_examples(path, fmt)
    enc = ChatEncoder(tokenizer)
    lengths = []
    failed = 0
    for ex in examples:
        try:
            if isinstance(ex, PreferenceExample):
                n = max(len(enc.encode_messages(ex.prompt + r, train_from=len(ex.prompt)).input_ids)
                        for r in (ex.chosen, ex.rejected))
            elif isinstance(ex, FeedbackExample):
                n = len(enc.encode_messages(ex.prompt + ex.completion, train_from=len(ex.prompt)).input_ids)
            elif isinstance(ex, PromptExample):
                text = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
                n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            elif ex.text is not None:
                n = len(enc.encode_text(ex.text).input_ids)
            else:
                n = len(enc.encode_messages(ex.messages).input_ids)
        except Exception:  # noqa: BLE001 - a user's template can raise anything; the row counts as dropped
            failed += 1
            continue
        lengths.append(n)
    if not lengths:
        raise PosttrainError(f"--data {path}: no usable row in format {fmt}\n{report.format()}")
    return lengths, report.total_dropped + failed


def _percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(path: str, fmt: str, lengths: list[int], dropped: int, max_positions: int | None,
              seq_len: int | None = None) -> LengthStats:
    values = sorted(lengths)
    p99 = _percentile(values, 0.99)
    suggested = SEQ_LEN_STEP * math.ceil(p99 / SEQ_LEN_STEP)
    if max_positions:
        suggested = min(suggested, int(max_positions))
    return LengthStats(
        path=str(path), format=fmt, rows=len(values), dropped=dropped, min=values[0],
        p50=_percentile(values, 0.5), p90=_percentile(values, 0.9), p99=p99, max=values[-1],
        mean=round(sum(values) / len(values), 1), suggested_seq_len=suggested, seq_len=seq_len or suggested,
        longer=sum(1 for v in values if v > (seq_len or suggested)),
    )
