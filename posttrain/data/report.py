"""The row-level data report: what was kept, what was dropped, and why.

Every stage that can reject or alter a row (parsing, schema validation,
rendering, tokenizing, truncation) records it here with the file, the row
number and the field, so the user sees one report for the whole pipeline.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from posttrain.errors import DataError

# Enough examples per reason to find the pattern without flooding the terminal.
EXAMPLES_PER_REASON = 5
# Bins of the token-length histogram of the training examples kept in data_report.json.
LENGTH_BINS = 20


@dataclass(frozen=True)
class RowIssue:
    file: str
    row: int  # 1-based: the line number in JSONL/CSV, the index + 1 in JSON lists and Parquet
    field: str  # dotted path into the row, e.g. "messages[2].role"; "" for the whole row
    reason: str  # a short category, the key the counts are grouped by
    detail: str = ""  # what exactly was wrong with this row

    def __str__(self) -> str:
        where = f"{self.file}:{self.row}"
        fld = f" field '{self.field}'" if self.field else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{where}{fld}: {self.reason}{detail}"


@dataclass
class DataReport:
    """Counts and examples of rows read, kept, dropped and altered."""

    rows_read: Counter = field(default_factory=Counter)  # per file
    rows_kept: Counter = field(default_factory=Counter)  # per file
    dropped: Counter = field(default_factory=Counter)  # per reason
    altered: Counter = field(default_factory=Counter)  # per reason (e.g. truncated), row kept
    examples: dict[str, list[RowIssue]] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)  # facts about kept rows, e.g. preference reject reasons
    lengths: dict | None = None  # token-length histogram of the training examples: {"bins": edges, "counts": n}

    def read(self, file: str, n: int = 1) -> None:
        self.rows_read[file] += n

    def kept(self, file: str, n: int = 1) -> None:
        self.rows_kept[file] += n

    def drop(self, issue: RowIssue) -> None:
        self.dropped[issue.reason] += 1
        self._example(issue)

    def alter(self, issue: RowIssue) -> None:
        self.altered[issue.reason] += 1
        self._example(issue)

    def note(self, what: str) -> None:
        self.notes[what] += 1

    def record_lengths(self, lengths: list[int]) -> None:
        """Keep a compact histogram (integer bin edges, counts) of the training examples' token lengths."""
        if not lengths:
            return
        lo, hi = min(lengths), max(lengths)
        edges = np.unique(np.linspace(lo, hi + 1, LENGTH_BINS + 1).round().astype(int))
        counts, _ = np.histogram(lengths, bins=edges)
        self.lengths = {"bins": edges.tolist(), "counts": counts.tolist()}

    def unkeep(self, file: str) -> None:
        """A row counted as kept by an earlier stage was dropped by a later one."""
        self.rows_kept[file] -= 1

    def _example(self, issue: RowIssue) -> None:
        bucket = self.examples.setdefault(issue.reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            bucket.append(issue)

    @property
    def total_read(self) -> int:
        return sum(self.rows_read.values())

    @property
    def total_kept(self) -> int:
        return sum(self.rows_kept.values())

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "DataReport") -> None:
        self.rows_read.update(other.rows_read)
        self.rows_kept.update(other.rows_kept)
        self.dropped.update(other.dropped)
        self.altered.update(other.altered)
        self.notes.update(other.notes)
        for issues in other.examples.values():
            for issue in issues:
                self._example(issue)

    def format(self, title: str = "data report") -> str:
        lines = [f"{title}: {self.total_kept} of {self.total_read} rows kept, {self.total_dropped} dropped"]
        for file in self.rows_read:
            lines.append(f"  {file}: {self.rows_kept[file]} of {self.rows_read[file]} kept")
        for label, counts in (("dropped", self.dropped), ("altered (kept)", self.altered)):
            for reason, n in counts.most_common():
                lines.append(f"  {label}: {n} x {reason}")
                for issue in self.examples.get(reason, []):
                    lines.append(f"    - {issue}")
                more = n - len(self.examples.get(reason, []))
                if more > 0:
                    lines.append(f"    ... and {more} more")
        for what, n in self.notes.most_common(10):
            lines.append(f"  noted: {n} x {what}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rows_read": dict(self.rows_read),
            "rows_kept": dict(self.rows_kept),
            "dropped": dict(self.dropped),
            "altered": dict(self.altered),
            "examples": {r: [vars(i) for i in issues] for r, issues in self.examples.items()},
            "notes": dict(self.notes),
            **({"lengths": self.lengths} if self.lengths else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        rep = cls(Counter(d["rows_read"]), Counter(d["rows_kept"]), Counter(d["dropped"]), Counter(d["altered"]))
        rep.examples = {r: [RowIssue(**i) for i in issues] for r, issues in d["examples"].items()}
        rep.notes = Counter(d.get("notes", {}))
        rep.lengths = d.get("lengths")
        return rep

    def check(self, max_drop_fraction: float, what: str = "training data") -> None:
        """Raise a DataError carrying the report when too little is usable."""
        if self.total_kept <= 0:
            raise DataError(f"no usable rows in the {what}.\n{self.format()}")
        frac = 1.0 - self.total_kept / max(self.total_read, 1)
        if frac > max_drop_fraction:
            raise DataError(
                f"{frac:.0%} of the rows in the {what} were dropped, more than "
                f"data.max_drop_fraction={max_drop_fraction}. Fix the rows below or raise the limit.\n"
                f"{self.format()}"
            )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
