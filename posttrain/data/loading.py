"""Read raw rows from a data file, numbered so every later issue can point at the exact row.

A row that cannot be parsed comes back as a ``RowIssue`` in its place, so one bad line
costs one row, not the file. A file that cannot be read at all (missing, unknown type,
not UTF-8, a .json file that is not one list) raises ``PosttrainError``: no row of it
can be trusted, and the user has to fix the file or the path.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from posttrain.data.formats import json_type
from posttrain.data.report import RowIssue
from posttrain.errors import PosttrainError

# CSV cannot nest, so exporters store chat columns as JSON text in one cell.
CSV_JSON_COLUMNS = ("messages", "conversations", "history", "score")
# Columns that hold either plain text or a JSON list of messages: text that merely starts with "[" stays text.
CSV_TEXT_OR_JSON_COLUMNS = ("prompt", "chosen", "rejected", "completion")
# CSV has no numbers: these columns are read as numbers when they parse as one.
CSV_NUMBER_COLUMNS = ("score_chosen", "score_rejected")
# Long documents easily exceed the csv module's default cell limit of 128 KiB;
# 2**31 - 1 is the largest limit every platform's C long accepts.
_CSV_FIELD_LIMIT = 2**31 - 1

Rows = Iterator[tuple[int, dict | RowIssue]]


def read_rows(path: str | Path) -> Rows:
    """Yield (row number, row) for every row of a .jsonl, .json, .parquet or .csv file.

    Row numbers are 1-based: the line number for JSONL and CSV (so a CSV's first data
    row is row 2), the index + 1 for JSON lists and Parquet. Errors are raised while
    iterating, like any generator's.
    """
    label = str(path)
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise PosttrainError(f"{label}: unsupported data file type {path.suffix or '(no extension)'!r}; {_SUPPORTED}")
    try:
        yield from reader(path, label)
    except OSError as e:
        raise PosttrainError(f"cannot read data file {label}: {e.strerror or e}; {_SUPPORTED}") from e
    except UnicodeDecodeError as e:
        raise PosttrainError(f"{label} is not valid UTF-8 text ({e.reason}); re-save it as UTF-8") from e


def _read_jsonl(path: Path, label: str) -> Rows:
    # Binary lines split on "\n" only, so row numbers match what an editor shows.
    with path.open("rb") as f:
        for row_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            value, error = _loads(line)
            if error:
                yield row_no, RowIssue(label, row_no, "", "malformed JSON", error)
            else:
                yield row_no, _as_row(value, label, row_no)


def _read_json(path: Path, label: str) -> Rows:
    value, error = _loads(path.read_bytes())
    if error:
        raise PosttrainError(
            f"{label} is not valid JSON ({error}); a .json data file holds one list of objects "
            "(use .jsonl for one object per line)"
        )
    if not isinstance(value, list):
        raise PosttrainError(f"{label}: a .json data file must hold one list of objects, got {json_type(value)}")
    for row_no, item in enumerate(value, start=1):
        yield row_no, _as_row(item, label, row_no)


def _read_parquet(path: Path, label: str) -> Rows:
    # Imported here: pyarrow is slow to import and only Parquet files need it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    except pa.ArrowException as e:
        raise PosttrainError(f"{label} is not a readable Parquet file: {e}") from e


def _read_csv(path: Path, label: str) -> Rows:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with path.open(newline="", encoding="utf-8-sig") as f:
        # csv.reader rather than DictReader: a row's number is the line it starts on, which only the
        # line count before reading it gives when cells span lines or blank lines are skipped.
        # strict: otherwise one unterminated quote silently swallows the rest of the file into a cell.
        reader = csv.reader(f, strict=True)
        header: list[str] | None = None
        row_no = 1
        try:
            while True:
                row_no = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    return
                if not cells:  # a blank line
                    continue
                if header is None:
                    header = cells
                    continue
                yield row_no, _csv_row(header, cells, label, row_no)
        except csv.Error as e:
            # The rest of the file cannot be split into rows reliably, so this is a file error.
            raise PosttrainError(f"{label}: cannot parse the CSV row starting on line {row_no} ({e})") from e


def _csv_row(header: list[str], cells: list[str], label: str, row_no: int) -> dict | RowIssue:
    if len(cells) > len(header):
        detail = f"{len(cells)} cells but only {len(header)} header names"
        return RowIssue(label, row_no, "", "malformed CSV", detail)
    row: dict = {}
    for name, cell in zip(header, cells):
        # CSV cannot tell an empty string from a missing value; missing is the safer reading.
        if cell == "":
            continue
        if name in CSV_JSON_COLUMNS and cell.lstrip()[:1] in ("[", "{"):
            cell, error = _loads(cell)
            if error:
                return RowIssue(label, row_no, name, "malformed JSON", error)
        elif name in CSV_TEXT_OR_JSON_COLUMNS and cell.lstrip()[:1] in ("[", "{"):
            parsed, error = _loads(cell)
            cell = cell if error else parsed
        elif name in CSV_NUMBER_COLUMNS:
            try:
                cell = float(cell)
            except ValueError:
                pass  # left as text: the row's validation names the field
        row[name] = cell
    return row


def _loads(data: bytes | str) -> tuple[object, str | None]:
    """(value, None), or (None, a short reason) so one bad row cannot stop the file."""
    try:
        return json.loads(data.decode("utf-8-sig") if isinstance(data, bytes) else data), None
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        return None, f"{e.msg} at {where}"
    except RecursionError:
        return None, "nested too deeply"


def _as_row(value: object, label: str, row_no: int) -> dict | RowIssue:
    if isinstance(value, dict):
        return value
    return RowIssue(label, row_no, "", "row is not an object", f"got {json_type(value)}")


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
_SUPPORTED = f"supported data file types: {', '.join(_READERS)}"
