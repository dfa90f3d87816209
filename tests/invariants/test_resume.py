"""A run killed after step 50 and resumed to 100 equals one uninterrupted 100-step run."""

import json

import pytest
import torch
from safetensors.torch import load_file

import posttrain.trainers.loop as loop
from tests.conftest import base_config, losses, metrics, run


class Crash(Exception):
    pass


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_uninterrupted(tmp_path, tiny_model, task_data, monkeypatch, mode):
    def config(name):
        return base_config(
            tiny_model, task_data["train"], tmp_path / name,
            tuning={"mode": mode, "lora": {"r": 4, "dropout": 0.1}},  # dropout: the RNG state must be restored too
            data={"packing": True},
            training={"max_steps": 100, "batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 50,
                      "learning_rate": 2e-3, "logging_steps": 5, "warmup_steps": 10},
        )

    whole = run(config("whole"))

    real_step = loop.Trainer._train_step

    def crash_after_50(self, batch):
        if self.state.step == 57:
            raise Crash()
        return real_step(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", crash_after_50)
    with pytest.raises(Crash):
        run(config("split"))
    split_dir = tmp_path / "split"
    assert json.loads((split_dir / "run.json").read_text())["status"] == "failed"
    assert not (split_dir / "final").exists()
    monkeypatch.setattr(loop.Trainer, "_train_step", real_step)
    resumed = run(config("split"), resume=True)

    assert [m["step"] for m in metrics(split_dir)] == [m["step"] for m in metrics(whole.parent)]
    assert losses(split_dir) == pytest.approx(losses(whole.parent), rel=1e-6)
    name = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    wa, wb = load_file(str(whole / name)), load_file(str(resumed / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_resume_from_scratch_without_checkpoint_refuses_to_mix_runs(tmp_path, tiny_model, task_data):
    from posttrain.errors import PosttrainError

    cfg = base_config(tiny_model, task_data["train"], tmp_path / "out")
    run(cfg)
    with pytest.raises(PosttrainError, match="--resume"):
        run(cfg)
