"""Synthetic data built locally and deterministically: tasks, corpora, JSONL files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from posttrain.io import atomic_write_text
from posttrain.data.synthetic.corpus import make_domain_corpus, make_general_corpus, tokenizer_corpus
from posttrain.data.synthetic.tasks import (
    TASKS,
    make_feedback_rows,
    make_preference_rows,
    make_prompt_rows,
    make_task_rows,
    split_train_test,
)

__all__ = [
    "TASKS",
    "make_domain_corpus",
    "make_feedback_rows",
    "make_general_corpus",
    "make_preference_rows",
    "make_prompt_rows",
    "make_task_rows",
    "split_train_test",
    "tokenizer_corpus",
    "write_jsonl",
]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (UTF-8); a reader never sees a half-written file."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
