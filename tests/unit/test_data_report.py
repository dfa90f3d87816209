"""The data report's token-length histogram of the training examples."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from posttrain.config import load_config
from posttrain.data.dataset import build_datasets
from posttrain.data.report import LENGTH_BINS, DataReport
from posttrain.data.synthetic import make_task_rows, write_jsonl
from tests.conftest import base_config


def test_record_lengths_keeps_a_compact_histogram_that_round_trips():
    lengths = [5, 5, 6, 9, 40, 100, 100]
    report = DataReport()
    report.record_lengths(lengths)
    bins, counts = report.lengths["bins"], report.lengths["counts"]
    assert len(counts) == len(bins) - 1 <= LENGTH_BINS
    assert bins[0] == 5 and bins[-1] == 101 and bins == sorted(set(bins))
    assert all(isinstance(b, int) for b in bins)
    assert bins[1] == 10 and counts[0] == 4 and counts[-1] == 2 and sum(counts) == len(lengths)
    again = DataReport.from_dict(json.loads(report.to_json()))
    assert again.lengths == report.lengths


def test_one_length_and_no_length():
    report = DataReport()
    report.record_lengths([])
    assert report.lengths is None and "lengths" not in report.to_dict()
    report.record_lengths([7, 7])
    assert report.lengths == {"bins": [7, 8], "counts": [2]}


def test_built_sets_record_example_lengths_before_packing(tmp_path, tiny_model):
    data = write_jsonl(make_task_rows(40, seed=0), tmp_path / "d.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(None, raw=base_config(tiny_model, data, tmp_path / "o", data={"packing": True}))
    train, _, report, _ = build_datasets(cfg.data, tok, "sft", seed=0, log=lambda *x: None)
    lengths = [len(x) for x in train.input_ids]
    assert len(train) < len(lengths)  # packing joined examples into fewer rows
    assert sum(report.lengths["counts"]) == len(lengths)
    assert report.lengths["bins"][0] == min(lengths) and report.lengths["bins"][-1] == max(lengths) + 1
    cached = build_datasets(cfg.data, tok, "sft", seed=0, log=lambda *x: None)[2]
    assert cached.lengths == report.lengths  # read back from the cache's report.json
