"""read_rows: every file type, exact row numbers, and bad rows turned into RowIssues."""

import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.loading import read_rows
from posttrain.data.report import RowIssue
from posttrain.errors import PosttrainError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_skipped(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n   \n{"text": "b"}\r\n{"text": "c"}')
    assert list(read_rows(p)) == [(1, {"text": "a"}), (4, {"text": "b"}), (5, {"text": "c"})]


def test_jsonl_bad_lines_become_issues_and_reading_goes_on(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": }\n[1, 2]\n7\n{"text": "\xff"}\n{"text": "z"}\n')
    rows = list(read_rows(p))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0][1] == {"text": "a"} and rows[5][1] == {"text": "z"}
    assert rows[1][1] == RowIssue(str(p), 2, "", "malformed JSON", "Expecting value at column 10")
    assert rows[2][1] == RowIssue(str(p), 3, "", "row is not an object", "got list")
    assert rows[3][1] == RowIssue(str(p), 4, "", "row is not an object", "got int")
    assert rows[4][1] == RowIssue(str(p), 5, "", "malformed JSON", "not valid UTF-8")


def test_jsonl_byte_order_mark_and_unicode_line_separators(tmp_path):
    # U+2028 inside a string must not count as a new line: row numbers follow "\n" only.
    p = tmp_path / "d.jsonl"
    p.write_bytes('\ufeff{"text": "a\u2028b"}\n{"text": "c"}\n'.encode())
    assert list(read_rows(p)) == [(1, {"text": "a\u2028b"}), (2, {"text": "c"})]


def test_file_label_is_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "d.jsonl", "oops\n")
    [(_, issue)] = list(read_rows("d.jsonl"))
    assert issue.file == "d.jsonl"


def test_json_list_rows_are_numbered_from_one(tmp_path):
    p = write(tmp_path / "d.json", json.dumps([{"text": "a"}, "x", {"text": "b"}], indent=2))
    rows = list(read_rows(p))
    assert rows == [
        (1, {"text": "a"}),
        (2, RowIssue(str(p), 2, "", "row is not an object", "got string")),
        (3, {"text": "b"}),
    ]


def test_json_that_is_not_a_list_is_a_file_error(tmp_path):
    p = write(tmp_path / "d.json", '{"text": "a"}')
    with pytest.raises(PosttrainError, match=r"d\.json.*list of objects.*got object"):
        list(read_rows(p))


def test_invalid_json_file_is_a_file_error_with_position(tmp_path):
    p = write(tmp_path / "d.json", '[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(PosttrainError, match=r"d\.json is not valid JSON \(Expecting value at line 3 column 10\)"):
        list(read_rows(p))


def test_parquet_rows_become_python_dicts(tmp_path):
    p = tmp_path / "d.parquet"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "n": 1},
        {"messages": [{"role": "user", "content": "a"}], "n": 2},
        {"messages": None, "n": 3},
    ]
    # Small row groups so reading spans several batches and numbering must carry across them.
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=1)
    got = list(read_rows(p))
    assert got == [(1, rows[0]), (2, rows[1]), (3, rows[2])]
    assert isinstance(got[0][1]["messages"][0], dict)


def test_corrupt_parquet_is_a_file_error(tmp_path):
    p = write(tmp_path / "d.parquet", "not parquet at all")
    with pytest.raises(PosttrainError, match=r"d\.parquet is not a readable Parquet file"):
        list(read_rows(p))


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    p = write(
        tmp_path / "d.csv",
        "instruction,input,output\n"
        'say hi,,hello\n'  # line 2, empty input
        "\n"  # line 3, blank
        '"two\nlines",x,y\n'  # lines 4-5
        "last,,z\n",  # line 6
    )
    assert list(read_rows(p)) == [
        (2, {"instruction": "say hi", "output": "hello"}),
        (4, {"instruction": "two\nlines", "input": "x", "output": "y"}),
        (6, {"instruction": "last", "output": "z"}),
    ]


def test_csv_chat_columns_hold_json(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    p = tmp_path / "d.csv"
    with p.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "note", "history"])
        w.writerow([json.dumps(msgs), "[not parsed]", ""])
        w.writerow(["plain text", "", json.dumps([["a", "b"]])])
        w.writerow(['[{"role": "user",', "", ""])
    rows = list(read_rows(p))
    assert rows[0] == (2, {"messages": msgs, "note": "[not parsed]"})
    assert rows[1] == (3, {"messages": "plain text", "history": [["a", "b"]]})
    assert rows[2][0] == 4
    issue = rows[2][1]
    assert (issue.row, issue.field, issue.reason) == (4, "messages", "malformed JSON")
    assert issue.detail.startswith("Expecting")


def test_csv_row_with_more_cells_than_header_is_an_issue(tmp_path):
    p = write(tmp_path / "d.csv", "text\nok\na,b\n")
    assert list(read_rows(p)) == [
        (2, {"text": "ok"}),
        (3, RowIssue(str(p), 3, "", "malformed CSV", "2 cells but only 1 header names")),
    ]


@pytest.mark.parametrize("bad", ['"unterminated\nrest\nof file\n', '"ab"c"\nd\n'])
def test_csv_broken_quoting_is_a_file_error_not_silent_loss(tmp_path, bad):
    p = write(tmp_path / "d.csv", "text\nok\n" + bad)
    with pytest.raises(PosttrainError, match=r"d\.csv: cannot parse the CSV row starting on line 3"):
        list(read_rows(p))


def test_csv_cells_longer_than_the_csv_module_default_limit(tmp_path):
    long = "x" * 300_000
    p = write(tmp_path / "d.csv", f"text\n{long}\n")
    assert list(read_rows(p)) == [(2, {"text": long})]


def test_csv_with_header_only_has_no_rows(tmp_path):
    assert list(read_rows(write(tmp_path / "d.csv", "text\n"))) == []


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv"])
def test_missing_file_names_path_and_supported_types(tmp_path, name):
    with pytest.raises(PosttrainError) as err:
        list(read_rows(tmp_path / name))
    assert str(tmp_path / name) in str(err.value)
    assert ".jsonl, .json, .parquet, .csv" in str(err.value)


def test_directory_is_not_a_data_file(tmp_path):
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    with pytest.raises(PosttrainError, match="cannot read data file"):
        list(read_rows(d))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n')
    p.chmod(0)
    with pytest.raises(PosttrainError, match="cannot read data file"):
        list(read_rows(p))


def test_unknown_extension_names_path_and_supported_types(tmp_path):
    p = write(tmp_path / "d.txt", "hello")
    with pytest.raises(PosttrainError) as err:
        list(read_rows(p))
    assert str(p) in str(err.value) and "'.txt'" in str(err.value)
    assert ".jsonl, .json, .parquet, .csv" in str(err.value)


def test_csv_that_is_not_utf8_is_a_file_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(PosttrainError, match=r"d\.csv is not valid UTF-8"):
        list(read_rows(p))
