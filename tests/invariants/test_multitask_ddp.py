"""Two CPU processes equal one with task mixing, replay and the L2 pull: the same plan, per-task metrics and weights."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.data.synthetic import make_general_corpus, make_task_rows, write_jsonl
from tests.conftest import base_config, metrics
from tests.invariants.test_ddp import _train


def test_two_processes_equal_one_with_mixing_replay_and_l2(tmp_path, tiny_model):
    rows = make_task_rows(120, seed=0, tasks=("add",)) + make_task_rows(30, seed=1, tasks=("upper",))
    train = write_jsonl(rows, tmp_path / "train.jsonl")
    text = write_jsonl([{"text": t} for t in make_general_corpus(60, seed=0)], tmp_path / "text.jsonl")

    def config(name, accumulation):
        return base_config(
            tiny_model, train, tmp_path / name,
            data={"packing": True, "mixing": {"strategy": "equal"},
                  "replay": {"sources": [{"path": str(text), "format": "text"}], "fraction": 0.25}},
            training={"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "l2_to_start": 0.5,
                      "gradient_accumulation_steps": accumulation},
        )

    _train(config("two", 1), tmp_path / "two.yaml", nproc=2)
    _train(config("one", 2), tmp_path / "one.yaml", nproc=1)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["devices"] == 2
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(a) == len(b) == 6
    for ma, mb in zip(a, b):
        # A process whose micro-batch has no row of a task still reports it, so the names agree.
        assert {k for k in ma if "/" in k} == {k for k in mb if "/" in k}
        for k in ma:
            if k.startswith(("loss", "token_share", "l2_")):
                assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-9), k
    assert a[-1]["l2_distance"] > 0 and any("loss/replay" in m for m in a)
    wa = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["training"]["l2_to_start"] == 0.5
