"""``posttrain synth tasks`` / ``synth corpus``: the rule-based generators written to dataset files.

Each row carries its provenance (``source``: generator, task, seed) beside the fields of its format.
With a test fraction the rows are split so that no prompt is on both sides.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.synthetic import corpus as corpora
from posttrain.data.synthetic import tasks as t
from posttrain.errors import PosttrainError

FORMATS = ("messages", "alpaca", "prompt", "preference", "feedback")
CORPORA = ("domain", "general")


def task_rows(n: int, seed: int, tasks: list[str], fmt: str) -> list[dict]:
    if fmt in ("messages", "alpaca"):
        rows = t.make_task_rows(n, seed, tasks, fmt=fmt)
    elif fmt == "prompt":
        rows = t.make_prompt_rows(n, seed, tasks)
    elif fmt == "preference":
        rows = t.make_preference_rows(n, seed, tasks)
    elif fmt == "feedback":
        rows = t.make_feedback_rows(n, seed, tasks)
    else:
        raise PosttrainError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return [{**row, "source": f"posttrain synth tasks: {row['task']}, seed {seed}"} for row in rows]


def write_tasks(out: str | Path, *, n: int, seed: int = 0, tasks: list[str] | None = None, fmt: str = "messages",
                test_fraction: float = 0.0, test_out: str | Path | None = None) -> list[tuple[Path, int]]:
    """Write ``n`` task rows to ``out`` (and the held-out share to ``test_out``); [(path, rows)]."""
    from posttrain.data.synthetic import split_train_test, write_jsonl

    names = tasks or ["add", "reverse", "upper", "count"]
    if names == ["all"]:
        names = sorted(t.TASKS)
    if n < 1:
        raise PosttrainError(f"--n must be at least 1; got {n}")
    if test_fraction and test_out is None:
        raise PosttrainError("--test-fraction needs --test-out: the file for the held-out rows")
    rows = task_rows(n, seed, names, fmt)
    if not test_fraction:
        return [(write_jsonl(rows, out), len(rows))]
    train, test = split_train_test(rows, test_fraction, seed)
    return [(write_jsonl(train, out), len(train)), (write_jsonl(test, test_out), len(test))]


def write_corpus(out: str | Path, *, n: int, seed: int = 0, kind: str = "domain") -> list[tuple[Path, int]]:
    from posttrain.data.synthetic import write_jsonl

    if kind not in CORPORA:
        raise PosttrainError(f"--kind must be one of {', '.join(CORPORA)}; got {kind!r}")
    if n < 1:
        raise PosttrainError(f"--n must be at least 1; got {n}")
    make = corpora.make_domain_corpus if kind == "domain" else corpora.make_general_corpus
    rows = [{"text": text, "source": f"posttrain synth corpus: {kind}, seed {seed}"} for text in make(n, seed)]
    return [(write_jsonl(rows, out), len(rows))]
