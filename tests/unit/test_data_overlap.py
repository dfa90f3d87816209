"""Duplicates, contamination and the rule-based generators from the command line."""

import json

import pytest

from posttrain.cli import main
from posttrain.data.overlap import contamination, deduplicate, ngrams, row_text
from posttrain.data.synthetic import write_jsonl
from posttrain.errors import DataError


def _msgs(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_row_text_and_normalised_ngrams():
    assert row_text({"prompt": "Hi", "chosen": "a", "rejected": "b"}) == "Hi\na\nb"
    assert row_text(_msgs("What is 2+3?", "5")) == "What is 2+3?\n5"
    assert ngrams("What is 2+3?", 8) == {("what", "is", "2", "3")}  # shorter than n: the whole text
    assert ngrams("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}


def test_contamination_flags_copied_and_contained_rows_only(tmp_path):
    long = "the quick brown fox jumps over the lazy dog near the river bank today"
    train = write_jsonl([_msgs("What is 2 + 3?", "5"), {"text": long}], tmp_path / "train.jsonl")
    evals = write_jsonl([
        _msgs("what is 2+3", "5"),                       # the same text, differently written: exact
        {"prompt": "jumps over the lazy dog near"},      # shorter than n, inside a training row
        {"text": long.replace("today", "tomorrow morning")},  # most 8-grams shared
        _msgs("What is 7 + 8?", "15"),                   # clean
        {"text": "an entirely different sentence about cooking pasta with fresh basil leaves"},  # clean
    ], tmp_path / "eval.jsonl")
    result = contamination([train], [evals], n=8, threshold=0.5)
    assert result.eval_rows == 5 and result.train_rows == 2
    assert [(c["row"], c["exact"]) for c in result.contaminated] == [(1, True), (2, False), (3, False)]
    assert result.contaminated[2]["overlap"] == pytest.approx(6 / 8)
    assert result.rate == pytest.approx(0.6)
    assert "3 of 5 eval rows (60.0%)" in result.format()


def test_deduplicate_keeps_the_first_of_normalised_duplicates():
    rows = [_msgs("What is 2+3?", "5"), _msgs("what is 2 + 3", "5"), _msgs("What is 2+3?", "6")]
    kept, dropped = deduplicate(rows)
    assert kept == [rows[0], rows[2]] and dropped == [(2, 1)]


def test_bad_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        contamination([bad], [bad])


def test_synth_cli_writes_split_task_files_and_contamination_exits_2(tmp_path, capsys):
    train, test = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    assert main(["synth", "tasks", "--out", str(train), "--n", "200", "--tasks", "add,largest", "--seed", "3",
                 "--test-fraction", "0.25", "--test-out", str(test)]) == 0
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    held = [json.loads(x) for x in test.read_text().splitlines()]
    assert len(rows) + len(held) == 200 and 40 <= len(held) <= 60
    assert {r["task"] for r in rows} == {"add", "largest"} and all("seed 3" in r["source"] for r in rows)
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in held}
    assert main(["data", "contamination", "--train", str(train), "--eval", str(test), "--fail-above", "0"]) == 0
    assert main(["data", "contamination", "--train", str(train), "--eval", str(train), "--fail-above", "0.5"]) == 2
    assert "above --fail-above" in capsys.readouterr().err
    assert main(["synth", "tasks", "--out", str(train), "--n", "5", "--tasks", "nope"]) == 2
