"""Load a data file into validated ``Example``s, recording every dropped row in the report.

Reading and schema checks both reject rows; this is where their verdicts meet the
report, so each row is counted exactly once: read, then kept or dropped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from posttrain.data.formats import Example, check_config, normalise
from posttrain.data.loading import read_rows
from posttrain.data.preference import FeedbackExample, PreferenceExample
from posttrain.data.report import DataReport, RowIssue


def load_examples(
    path: str | Path, fmt: str, *, role_map: dict[str, str] | None = None, report: DataReport | None = None
) -> tuple[list[Example] | list[PreferenceExample] | list[FeedbackExample], DataReport]:
    """Read and normalise every row of ``path``; return the kept examples in file order and the report.

    The examples are ``PreferenceExample``s for format "preference", ``FeedbackExample``s for
    "feedback", and ``Example``s otherwise.

    Pass ``report`` to accumulate several files into one report. Deciding whether too
    much was dropped is the caller's job (``DataReport.check``).
    """
    check_config(fmt, role_map)  # before reading, so a config mistake is not hidden by an empty file
    report = DataReport() if report is None else report
    file = str(path)
    report.read(file, 0)  # list the file in the report even when it holds no rows
    examples = []
    for row_no, row in read_rows(path):
        report.read(file)
        if isinstance(row, RowIssue):
            report.drop(row)
            continue
        result = normalise(row, fmt, file=file, row_no=row_no, role_map=role_map)
        if isinstance(result, list):
            report.drop(_one_issue(result))
        else:
            report.kept(file)
            examples.append(result)
    return examples, report


def _one_issue(issues: list[RowIssue]) -> RowIssue:
    """Count a row once, under its first issue, without hiding the others from the user."""
    first, rest = issues[0], issues[1:]
    if not rest:
        return first
    others = "; ".join(f"{i.field or 'row'}: {i.reason}" + (f" ({i.detail})" if i.detail else "") for i in rest)
    return replace(first, detail=f"{first.detail}; also {others}" if first.detail else f"also {others}")
