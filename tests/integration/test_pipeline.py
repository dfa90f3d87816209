"""posttrain run: pretrain -> SFT -> DPO chained, skipped when done, resumed when interrupted, one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import posttrain.trainers.loop as loop
from posttrain.errors import ConfigError, PosttrainError
from posttrain.pipeline import build_pipeline, plan, run_pipeline
from tests.conftest import metrics


class Crash(Exception):
    pass


def _pipeline(tiny_model: Path, domain_data: Path, task_data: dict, preference_data: dict, out: Path) -> dict:
    return {
        "name": "tiny",
        "output_dir": str(out),
        "defaults": {
            "model": {"name_or_path": str(tiny_model)},
            "tuning": {"mode": "full"},
            "data": {"max_seq_len": 96, "cache_dir": str(out.parent / "cache")},
            "training": {"batch_size": 4, "learning_rate": 2e-3, "logging_steps": 1, "progress_bar": False,
                         "seed": 0},
            "eval": {"suites": [{"name": "domain", "type": "perplexity", "path": str(domain_data),
                                 "limit": 16}]},
        },
        "stages": [
            {"name": "pretrain", "method": "pretrain",
             "data": {"train": [{"path": str(domain_data), "format": "text"}]}, "training": {"max_steps": 3}},
            {"name": "sft", "method": "sft", "data": {"train": str(task_data["train"])},
             "training": {"max_steps": 6, "save_steps": 2}},
            {"name": "dpo", "method": "dpo",
             "data": {"train": [{"path": str(preference_data["train"]), "format": "preference"}]},
             "training": {"max_steps": 3}, "preference": {"dpo": {"beta": 0.1}}},
        ],
    }


def _started(out: Path) -> dict[str, str]:
    return {n: json.loads((out / n / "run.json").read_text())["started"] + str((out / n / "final").stat().st_mtime_ns)
            for n in ("pretrain", "sft", "dpo")}


@pytest.mark.slow
def test_pipeline_chains_skips_resumes_and_reports(tmp_path, tiny_model, domain_data, task_data, preference_data,
                                                   monkeypatch):
    out = tmp_path / "pipe"
    raw = _pipeline(tiny_model, domain_data, task_data, preference_data, out)
    lines: list[str] = []
    run_pipeline(build_pipeline(raw), log=lines.append)

    # Each stage starts from the one before it, and is evaluated before and after.
    for name, start in (("pretrain", tiny_model), ("sft", out / "pretrain" / "final"), ("dpo", out / "sft" / "final")):
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert Path(config["model"]["name_or_path"]) == Path(start)
        suite = json.loads((out / name / "eval.json").read_text())["suites"][0]
        assert suite["before"] and suite["after"]
        assert (out / name / "final" / "config.json").is_file()
    # Continued pretraining lowered the domain perplexity it was measured on.
    pre = json.loads((out / "pretrain" / "eval.json").read_text())["suites"][0]
    assert pre["after"]["perplexity"] < pre["before"]["perplexity"]
    report = (out / "report.html").read_text()
    assert all(name in report for name in ("pretrain", "sft", "dpo"))
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert [state[n]["status"] for n in ("pretrain", "sft", "dpo")] == ["done"] * 3

    # Again: every stage is skipped and nothing is rewritten.
    before = _started(out)
    lines.clear()
    steps = run_pipeline(build_pipeline(raw), log=lines.append)
    assert [s.action for s in steps] == ["skip"] * 3
    assert sum("skipped" in line for line in lines) == 3
    assert _started(out) == before

    # Only the eval suites change: nothing trains again, the stages are re-evaluated.
    raw["defaults"]["eval"]["suites"][0]["limit"] = 8
    steps = run_pipeline(build_pipeline(raw), log=lines.append)
    assert [s.action for s in steps] == ["evaluate"] * 3
    assert _started(out) == before
    assert json.loads((out / "sft" / "eval.json").read_text())["suites"][0]["n"] == 8

    # A change to SFT re-runs SFT and DPO (which reads it), not pretraining; SFT is cut at step 4 of 6.
    raw["stages"][1]["training"]["learning_rate"] = 1e-3
    assert [s.action for s in plan(build_pipeline(raw))] == ["skip", "run", "run"]
    real_step = loop.Trainer._train_step

    def crash(self, batch):
        if self.state.step == 3 and "sft" in str(self.out):
            raise Crash()
        return real_step(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", crash)
    with pytest.raises(Crash):
        run_pipeline(build_pipeline(raw), log=lines.append)
    superseded = list((out / "superseded").iterdir())
    assert [p.name.split("-")[0] for p in superseded] == ["sft"]  # the old SFT run was kept, not deleted
    assert (superseded[0] / "final").is_dir()
    monkeypatch.setattr(loop.Trainer, "_train_step", real_step)

    steps = plan(build_pipeline(raw))
    assert [s.action for s in steps] == ["skip", "resume", "run"]
    assert "step-2" in steps[1].reason
    lines.clear()
    run_pipeline(build_pipeline(raw), log=lines.append)
    assert any("resumed from" in line and "step 2 of 6" in line for line in lines)
    assert [m["step"] for m in metrics(out / "sft") if "loss" in m] == [1, 2, 3, 4, 5, 6]
    config = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert config["training"]["learning_rate"] == 1e-3
    assert [s.action for s in plan(build_pipeline(raw))] == ["skip"] * 3


def test_stage_references_reward_stage_and_repeated_groups(tmp_path, tiny_model):
    raw = {
        "output_dir": str(tmp_path / "p"),
        "defaults": {"model": {"name_or_path": str(tiny_model)}, "data": {"train": "x.jsonl"}},
        "stages": [
            {"name": "sft", "method": "sft"},
            {"name": "rm", "method": "reward"},
            {"name": "ppo", "method": "ppo",
             "online": {"rewards": [{"type": "reward_model", "path": "${rm}"}]}},
            {"name": "loop", "repeat": 2, "stages": [
                {"name": "rft", "method": "rft", "training": {"seed": "${round}"},
                 "online": {"rewards": [{"type": "exact_match"}]}},
                {"name": "simpo", "method": "simpo"},
            ]},
            {"name": "base-dpo", "method": "dpo", "from": "sft"},
        ],
    }
    p = build_pipeline(raw)
    root = tmp_path / "p"
    assert p.names == ["sft", "rm", "ppo", "loop.1.rft", "loop.1.simpo", "loop.2.rft", "loop.2.simpo", "base-dpo"]
    model = {s.name: Path(s.config.model.name_or_path) for s in p.stages}
    assert model["sft"] == tiny_model
    assert model["rm"] == root / "sft" / "final"  # the reward model starts from the policy
    assert model["ppo"] == root / "sft" / "final"  # a reward stage does not feed the next stage's model
    assert Path(p.stage("ppo").config.online.rewards[0]["path"]) == root / "rm" / "final"
    assert p.stage("ppo").depends_on == ["sft", "rm"]
    assert model["loop.1.rft"] == root / "ppo" / "final"
    assert model["loop.2.rft"] == root / "loop.1.simpo" / "final"
    assert [p.stage(f"loop.{r}.rft").config.training.seed for r in (1, 2)] == [1, 2]
    assert model["base-dpo"] == root / "sft" / "final"
    assert p.stage("loop.2.simpo").config.output_dir == str(root / "loop.2.simpo")


@pytest.mark.parametrize("change, message", [
    ({"stages": []}, "non-empty list"),
    ({"stages": [{"name": "a b", "method": "sft"}]}, "letters, digits"),
    ({"stages": [{"name": "a", "method": "sft"}, {"name": "a", "method": "sft"}]}, "used twice"),
    ({"stages": [{"name": "a", "method": "sft", "from": "zz"}]}, "names no earlier stage"),
    ({"stages": [{"name": "a", "method": "sft", "output_dir": "x"}]}, "set by the pipeline"),
    ({"stages": [{"name": "a", "method": "sft", "training": {"seed": "${round}"}}]}, "repeated group"),
    ({"stages": [{"name": "g", "repeat": 0, "stages": [{"name": "a", "method": "sft"}]}]}, "repeat must be"),
    ({"stages": [{"name": "a", "method": "sft", "training": {"max_stepz": 3}}]},
     "(?s)stage a: invalid config:.*training.max_stepz: unknown key"),
    ({"output_dir": None}, "output_dir is required"),
    ({"extra": 1}, "unknown top-level"),
])
def test_bad_pipelines_get_clear_errors(tmp_path, tiny_model, change, message):
    raw = {"output_dir": str(tmp_path / "p"),
           "defaults": {"model": {"name_or_path": str(tiny_model)}, "data": {"train": "x.jsonl"}},
           "stages": [{"name": "a", "method": "sft"}]}
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        build_pipeline(raw, source="pipe.yaml")


def test_only_refuses_a_stage_whose_input_is_not_ready(tmp_path, tiny_model, task_data):
    raw = {"output_dir": str(tmp_path / "p"),
           "defaults": {"model": {"name_or_path": str(tiny_model)}, "data": {"train": str(task_data["train"])}},
           "stages": [{"name": "a", "method": "sft"}, {"name": "b", "method": "sft"}]}
    with pytest.raises(PosttrainError, match="--only b: it reads stage a"):
        run_pipeline(build_pipeline(raw), only=["b"], log=lambda *a: None)


def test_cli_dry_run_prints_the_plan(tmp_path, tiny_model, task_data, capsys):
    from posttrain.cli import main

    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "p"),
        "defaults": {"model": {"name_or_path": str(tiny_model)}, "data": {"train": str(task_data["train"])}},
        "stages": [{"name": "first", "method": "sft"}, {"name": "second", "method": "dpo"}],
    }))
    assert main(["run", str(path), "training.max_steps=2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "first" in printed and "second" in printed and printed.count("not run yet") == 2
    assert not (tmp_path / "p").exists()
