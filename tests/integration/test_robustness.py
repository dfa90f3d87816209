"""Bad input, non-finite losses, early stopping, crash-safe checkpoints and the tokenized-data cache."""

import json
import os

import pytest
import torch

import posttrain.trainers.loop as loop
from posttrain.errors import DataError
from tests.conftest import base_config, metrics, run


def _good(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}


def _bad_file(path):
    lines = [json.dumps(_good(i)) for i in range(16)]
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated"'  # row 3: malformed JSON
    lines[5] = json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]})
    lines[8] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]})
    lines[11] = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}]})
    lines[14] = json.dumps({"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text("\n".join(lines) + "\n")
    return path


EXPECTED = {
    "malformed JSON": 3,
    "wrong type": 6,
    "empty response": 9,
    "does not end with an assistant turn": 12,
    "unknown role": 15,
}


def test_bad_rows_are_reported_and_training_runs_on_the_rest(tmp_path, tiny_model):
    data = _bad_file(tmp_path / "mixed.jsonl")
    run(base_config(tiny_model, data, tmp_path / "o", data={"max_drop_fraction": 0.5},
                    training={"batch_size": 4, "max_steps": 2}))
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert report["rows_read"] == {str(data): 16} and report["rows_kept"] == {str(data): 11}
    assert report["dropped"] == {reason: 1 for reason in EXPECTED}
    for reason, row in EXPECTED.items():
        (issue,) = report["examples"][reason]
        assert issue["row"] == row and issue["file"] == str(data)
    assert (tmp_path / "o" / "final" / "model.safetensors").is_file()


def test_too_many_bad_rows_is_an_error_with_the_report(tmp_path, tiny_model):
    data = _bad_file(tmp_path / "mixed.jsonl")
    with pytest.raises(DataError) as err:
        run(base_config(tiny_model, data, tmp_path / "o", data={"max_drop_fraction": 0.1}))
    assert "31% of the rows" in str(err.value) and f"{data}:15" in str(err.value)


def _poison_at(step, monkeypatch):
    real = loop.Trainer._train_step

    def poisoned(self, batch):
        if self.state.step + 1 == step:
            real_loss = self.method.loss
            self.method.loss = lambda m, b: (real_loss(m, b)[0] * float("nan"), {})
            try:
                return real(self, batch)
            finally:
                self.method.loss = real_loss
        return real(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", poisoned)


def test_nan_loss_stops_and_writes_no_final(tmp_path, tiny_model, task_data, monkeypatch):
    _poison_at(3, monkeypatch)
    with pytest.raises(loop.NonFiniteLoss, match="step 3"):
        run(base_config(tiny_model, task_data["train"], tmp_path / "o", training={"max_steps": 5, "save_steps": 2}))
    assert not (tmp_path / "o" / "final").exists()
    assert (tmp_path / "o" / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "failed"


def test_nan_loss_skipped_when_configured(tmp_path, tiny_model, task_data, monkeypatch):
    _poison_at(3, monkeypatch)
    final = run(base_config(tiny_model, task_data["train"], tmp_path / "o",
                            training={"max_steps": 5, "nan_policy": "skip"}))
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert info["status"] == "completed" and info["skipped_steps"] == 1
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(final / "model.safetensors")).values())


def test_early_stopping_keeps_and_returns_the_best(tmp_path, tiny_model, task_data, monkeypatch):
    scores = iter([9.0, 5.0, 4.0, 4.5, 4.6, 4.7, 4.8])  # baseline, then steps 1..6
    monkeypatch.setattr(loop.Trainer, "evaluate", lambda self: {"eval_loss": next(scores), "eval_ppl": 0.0})
    cfg = base_config(tiny_model, task_data["train"], tmp_path / "o", data={"eval": str(task_data["eval"])},
                      training={"max_steps": 10, "eval_steps": 1, "early_stopping_patience": 2,
                                "save_total_limit": 1, "save_steps": 1})
    final = run(cfg)
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert info["status"] == "early_stopped" and info["steps"] == 4 and info["best_step"] == 2
    assert (tmp_path / "o" / "checkpoints" / "step-2").is_dir()  # kept despite save_total_limit=1
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "o" / "checkpoints" / "step-2" / "model" / "model.safetensors"))
    got = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(best[k], got[k]) for k in best)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model, task_data, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def flaky(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # killed mid-write of the second checkpoint
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(base_config(tiny_model, task_data["train"], tmp_path / "o", training={"max_steps": 6, "save_steps": 2}))
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "interrupted"
    ckpts = sorted(os.listdir(tmp_path / "o" / "checkpoints"))
    assert ckpts == ["step-2"]  # no partial step-4, no temporary left behind
    assert (tmp_path / "o" / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    monkeypatch.setattr(torch, "save", real_save)
    run(base_config(tiny_model, task_data["train"], tmp_path / "o", training={"max_steps": 6, "save_steps": 2}),
        resume=True)
    assert [m["step"] for m in metrics(tmp_path / "o")] == [1, 2, 3, 4, 5, 6]


def test_tokenized_data_is_cached_and_rebuilt_on_change(tmp_path, tiny_model, task_data):
    logs = []
    from posttrain.config import load_config
    from posttrain.trainers.stage import run_stage

    def go(name, **data):
        cfg = base_config(tiny_model, task_data["train"], tmp_path / name, data=data, training={"max_steps": 1})
        logs.clear()
        run_stage(load_config(None, raw=cfg), log=logs.append)
        return any("loaded from cache" in str(x) for x in logs)

    assert not go("a")
    assert go("b")
    assert not go("c", max_seq_len=80)
    assert go("d", max_seq_len=80)
