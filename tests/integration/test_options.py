"""Data weights, over-long handling, gradient checkpointing, TensorBoard and the final generation config."""

import json

import pytest
from transformers import AutoTokenizer

from posttrain.config import load_config
from posttrain.data.dataset import build_datasets
from posttrain.data.synthetic import make_task_rows, write_jsonl
from tests.conftest import base_config, losses, run


def _rows(tmp_path, name, n, seed):
    return write_jsonl(make_task_rows(n, seed=seed), tmp_path / f"{name}.jsonl")


def test_file_weights_repeat_and_subsample(tmp_path, tiny_model):
    a, b = _rows(tmp_path, "a", 40, 1), _rows(tmp_path, "b", 40, 2)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(None, raw=base_config(tiny_model, a, tmp_path / "o", data={
        "train": [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}]}))
    train, _, report, _ = build_datasets(cfg.data, tok, "sft", seed=0, log=lambda *x: None)
    assert len(train) == 2 * 40 + 20
    assert report.total_kept == 80  # weights change sampling, not the rows kept


@pytest.mark.parametrize("overlong, kept, reason", [("drop", 0, "too long"), ("truncate", 1, "truncated")])
def test_overlong_conversations_are_counted(tmp_path, tiny_model, overlong, kept, reason):
    long_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "c"}]
    rows = make_task_rows(20, seed=0) + [{"messages": long_turns}]
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(None, raw=base_config(tiny_model, data, tmp_path / "o", data={"overlong": overlong, "max_seq_len": 64}))
    train, _, report, _ = build_datasets(cfg.data, tok, "sft", seed=0, log=lambda *x: None)
    assert len(train) == 20 + kept
    counts = report.dropped if overlong == "drop" else report.altered
    assert counts == {reason: 1}
    assert all(len(x) <= 64 for x in train.input_ids)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model, task_data):
    plain = run(base_config(tiny_model, task_data["train"], tmp_path / "plain"))
    ckpt = run(base_config(tiny_model, task_data["train"], tmp_path / "ckpt", training={"gradient_checkpointing": True}))
    assert losses(plain.parent) == pytest.approx(losses(ckpt.parent), rel=1e-5)


def test_tensorboard_and_end_of_turn_in_final(tmp_path, tiny_model, task_data):
    final = run(base_config(tiny_model, task_data["train"], tmp_path / "o", training={"report_to": ["tensorboard"]}))
    assert list((tmp_path / "o" / "tensorboard").glob("events.out.tfevents.*"))
    tok = AutoTokenizer.from_pretrained(final)
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template  # the template travels with the model
