"""On-device adaptation: LoRA over an int8 base on CPU within a memory budget, a second version trained on top of
the first, rollback to the first version's exact logits, and a run over its budget refused."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from posttrain.data.synthetic import make_task_rows, write_jsonl

pytest.importorskip("torchao")

BUDGET_MB = 1500


@pytest.fixture(scope="module")
def device(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("device")
    rows = make_task_rows(400, seed=11, tasks=("larger",))
    config = {
        "model": {"name_or_path": str(tiny_model), "quantize": "int8"},
        "method": "sft",
        "tuning": {"mode": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"train": str(write_jsonl(rows[:200], root / "day1.jsonl")),
                 "eval": str(write_jsonl(rows[360:], root / "eval.jsonl")), "max_seq_len": 64,
                 "cache_dir": str(root / "cache")},
        "training": {"max_steps": 16, "batch_size": 8, "learning_rate": 5e-3, "lr_scheduler": "constant",
                     "logging_steps": 4, "eval_steps": 16, "progress_bar": False, "seed": 0},
        "memory": {"budget_mb": BUDGET_MB},
        "output_dir": "unused",
    }
    path = root / "device.yaml"
    path.write_text(yaml.safe_dump(config))
    # Its own process: its peak (VmHWM, reset at exec) is then the training's alone, not this test session's.
    done = subprocess.run([sys.executable, "-m", "posttrain", "device", "train", str(path), "--dir", str(root / "D")],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "dir": root / "D", "config": config, "day2": write_jsonl(rows[200:360], root / "day2.jsonl")}


def _evals(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["eval_loss"] for x in lines if "eval_loss" in json.loads(x)]


def _logits(device_dir, version=None) -> torch.Tensor:
    from posttrain.ondevice.versions import load_device_model

    model, tokenizer = load_device_model(device_dir, version)
    ids = tokenizer(["Which is larger, 31 or 74?", "Which is larger, 90 or 12?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids, use_cache=False).logits


def test_first_version_learns_on_an_int8_base_within_its_memory_budget(device):
    from posttrain.export.quantize import quantized_linears
    from posttrain.ondevice.versions import current_version, load_device_model

    v1 = current_version(device["dir"])
    assert v1.name == "v1" and v1.info["parent"] is None
    run = json.loads((device["dir"] / "runs" / "v1" / "run.json").read_text())
    assert run["status"] == "completed" and run["within_memory_budget"] is True
    assert 0 < run["peak_rss_mb"] < BUDGET_MB and v1.info["peak_rss_mb"] == run["peak_rss_mb"]
    before, *_, after = _evals(device["dir"] / "runs" / "v1")
    assert after < before - 0.2  # held-out loss at step 0 and after the last step
    # The adapter is a small fraction of the base, and the base under it is int8.
    assert v1.info["adapter_bytes"] < v1.info["base_bytes"] / 5
    model, _ = load_device_model(device["dir"])
    done, kept = quantized_linears(model.get_base_model())
    assert len(done) == 14 and [n for n in kept if ".lora_" not in n] == ["lm_head"]


def test_second_version_starts_from_the_first_and_rollback_restores_its_logits(device):
    from posttrain.config import load_config
    from posttrain.ondevice.versions import current_version, rollback, train_version

    first = _logits(device["dir"])
    raw = {**device["config"], "data": {**device["config"]["data"], "train": str(device["day2"])},
           "memory": {"budget_mb": None}}  # measured in its own process above; here the test session's RSS counts
    v2 = train_version(load_config(None, raw=raw), device["dir"], log=lambda *a, **k: None)
    assert v2.name == "v2" and v2.info["parent"] == "v1" and current_version(device["dir"]).name == "v2"
    # v2's LoRA started from v1's weights: its step-0 evaluation is v1's last one.
    assert _evals(device["dir"] / "runs" / "v2")[0] == pytest.approx(_evals(device["dir"] / "runs" / "v1")[-1],
                                                                     rel=1e-5)
    second = _logits(device["dir"])
    assert not torch.allclose(first, second, atol=1e-3)
    assert rollback(device["dir"]) == ("v2", "v1")
    assert torch.equal(_logits(device["dir"]), first)
    assert torch.equal(_logits(device["dir"], "v2"), second)  # kept: it can be made current again
    assert rollback(device["dir"], "v2") == ("v1", "v2")


def test_a_run_over_its_memory_budget_is_refused_and_leaves_the_versions_alone(device):
    from posttrain.config import load_config
    from posttrain.ondevice.memory import MemoryBudgetExceeded
    from posttrain.ondevice.versions import current_version, train_version, versions

    before = current_version(device["dir"]).name
    raw = {**device["config"], "memory": {"budget_mb": 1}}
    with pytest.raises(MemoryBudgetExceeded, match="over memory.budget_mb=1 at step 1"):
        train_version(load_config(None, raw=raw), device["dir"], log=lambda *a, **k: None)
    assert current_version(device["dir"]).name == before
    assert "v3" not in [v.name for v in versions(device["dir"])]
    run = json.loads((device["dir"] / "runs" / "v3" / "run.json").read_text())
    assert run["status"] == "failed" and run["within_memory_budget"] is False


def test_int4_cannot_train_and_an_adapter_folder_is_not_merged_into_int8(device, tiny_model):
    from posttrain.config import ModelConfig, load_config
    from posttrain.errors import ConfigError, PosttrainError
    from posttrain.models.load import load_model

    # torchao's int4 linear has no backward: refused for training on any machine.
    with pytest.raises(ConfigError, match="model.quantize=int4 cannot train"):
        load_config(None, raw={**device["config"], "model": {"name_or_path": str(tiny_model), "quantize": "int4"}})
    v1 = str(device["dir"] / "versions" / "v1")
    with pytest.raises(PosttrainError, match=re.escape(f"continue the adapter with tuning.lora.init_from={v1!r}")):
        load_model(ModelConfig(name_or_path=v1, quantize="int8"), "lora")


def test_init_from_an_adapter_of_another_shape_is_refused(device, model):
    from posttrain.config import TuningConfig
    from posttrain.errors import ConfigError
    from posttrain.tuning import apply_tuning

    v1 = str(device["dir"] / "versions" / "v1")
    tuning = TuningConfig(mode="lora", lora={"r": 4, "alpha": 16, "init_from": v1})
    with pytest.raises(ConfigError, match="r: saved 8, config 4"):
        apply_tuning(model, tuning)
