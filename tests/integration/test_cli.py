"""The command line, as a user runs it: readable output, readable errors, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from tests.conftest import base_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_tiny_model_then_train_with_overrides(tmp_path, task_data):
    out = _cli("tiny-model", tmp_path / "m", "--layers", 1, "--hidden", 32)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 1
    cfg = base_config(tmp_path / "m", task_data["train"], tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = _cli("train", tmp_path / "c.yaml", "training.max_steps=3", "tuning.mode=lora")
    assert out.returncode == 0, out.stderr
    assert "trainable params" in out.stdout and "final model in" in out.stdout
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 3 and resolved["tuning"]["mode"] == "lora"


def test_config_typo_is_one_readable_line(tmp_path, tiny_model, task_data, capsys):
    cfg = base_config(tiny_model, task_data["train"], tmp_path / "run")
    cfg["training"]["learnig_rate"] = 1e-4
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "training.learnig_rate: unknown key" in err and "Traceback" not in err


def test_data_check_reports_rows(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "x", "output": ""}\nnot json\n')
    assert main(["data", "check", str(f), "--format", "alpaca"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 rows kept" in out and f"{f}:2" in out and "empty response" in out and f"{f}:3" in out
    f.write_text("nope\n")
    assert main(["data", "check", str(f), "--format", "alpaca"]) == 2
    assert "no usable rows" in capsys.readouterr().err


def test_data_preview_marks_trained_tokens(tmp_path, tiny_model, task_data, capsys):
    cfg = base_config(tiny_model, task_data["train"], tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "preview", str(tmp_path / "c.yaml"), "-n", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    first = json.loads(Path(task_data["train"]).read_text().splitlines()[0])
    answer = first["messages"][-1]["content"]
    assert f"<|im_start|>assistant\n[[{answer}<|im_end|>]]" in out
    assert out.count("\n--- ") == 2 and ", trained " in out


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")
                                           if not p.name.startswith("accelerate-")))  # those are launcher configs
def test_recipes_are_valid_configs(recipe):
    from posttrain.config import METHODS, load_config, read_yaml
    from posttrain.pipeline import load_pipeline

    if "stages" in read_yaml(RECIPES / recipe):
        methods = [s.config.method for s in load_pipeline(RECIPES / recipe).stages]
    else:
        methods = [load_config(RECIPES / recipe).method]
    assert methods and all(m in METHODS for m in methods)
