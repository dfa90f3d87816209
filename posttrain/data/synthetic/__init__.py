"""Synthetic data built locally and deterministically: tasks, corpora, JSONL files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from posttrain.data.synthetic.corpus import make_domain_corpus, make_general_corpus, tokenizer_corpus
from posttrain.data.synthetic.tasks import TASKS, make_task_rows, split_train_test

__all__ = [
    "TASKS",
    "make_domain_corpus",
    "make_general_corpus",
    "make_task_rows",
    "split_train_test",
    "tokenizer_corpus",
    "write_jsonl",
]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (UTF-8); a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
