"""Shared fixtures: one tiny model and small synthetic data sets per test session, built locally."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.data.synthetic import (
    make_domain_corpus,
    make_feedback_rows,
    make_preference_rows,
    make_task_rows,
    split_train_test,
    write_jsonl,
)
from posttrain.models.tiny import build_tiny_model, build_tiny_moe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (4 experts, top-2, 2 layers) with the tiny model's tokenizer and chat template."""
    return build_tiny_moe(tmp_path_factory.mktemp("models") / "tiny-moe", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The tiny model's tokenizer, fresh for each test module (a module may change it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model, fresh for each test module (a module may change its generation config)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def tiny_model_with_biases(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with attention and MLP biases, for BitFit."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.attention_bias = True
    cfg.mlp_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("models") / "tiny-bias"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    train, test = split_train_test(make_task_rows(800, seed=0), 0.1, seed=0)
    return {"train": write_jsonl(train, folder / "train.jsonl"), "eval": write_jsonl(test, folder / "eval.jsonl")}


@pytest.fixture(scope="session")
def domain_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("domain")
    return write_jsonl([{"text": t} for t in make_domain_corpus(400, seed=0)], folder / "corpus.jsonl")


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory) -> dict[str, Path]:
    """Pairs whose chosen answer is right and rejected a near miss; feedback rows likewise; held-out pairs."""
    folder = tmp_path_factory.mktemp("preference")
    return {
        "train": write_jsonl(make_preference_rows(400, seed=1), folder / "pairs.jsonl"),
        "eval": write_jsonl(make_preference_rows(80, seed=2), folder / "pairs_eval.jsonl"),
        "feedback": write_jsonl(make_feedback_rows(400, seed=1), folder / "feedback.jsonl"),
    }


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory, tiny_model, task_data) -> Path:
    """The tiny model after a short SFT on the synthetic tasks: the start of every preference stage."""
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = base_config(
        tiny_model, task_data["train"], out, data={"packing": True},
        training={"max_steps": 40, "learning_rate": 3e-3, "warmup_steps": 10, "logging_steps": 40},
    )
    return run(cfg)


def preference_config(model: Path, pdata: dict[str, Path], out: Path, method: str, **sections) -> dict:
    """A preference stage on ``data`` (the preference_data fixture): KTO trains on the feedback rows."""
    train = {"path": str(pdata["feedback"]), "format": "feedback"} if method == "kto" else {
        "path": str(pdata["train"]), "format": "preference"}
    raw = base_config(
        model, pdata["train"], out, method=method,
        data={"train": [train], "eval": [{"path": str(pdata["eval"]), "format": "preference"}]},
        training={"max_steps": 60, "learning_rate": 2e-3, "logging_steps": 10, "eval_steps": 60},
    )
    return _merge(raw, sections)


def base_config(model: Path, train: Path, out: Path, **sections) -> dict:
    """A small SFT config; ``sections`` deep-merge into it."""
    raw = {
        "model": {"name_or_path": str(model)},
        "method": "sft",
        "tuning": {"mode": "full"},
        "data": {"train": str(train), "max_seq_len": 96, "cache_dir": str(out.parent / "cache")},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
                     "progress_bar": False, "seed": 0},
        "output_dir": str(out),
    }
    return _merge(raw, sections)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(raw: dict, **kw) -> Path:
    from posttrain.trainers.stage import run_stage

    return run_stage(load_config(None, raw=raw), log=lambda *a, **k: None, **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="session")
def largest_task(tmp_path_factory) -> dict:
    """A split-digit tiny model after 80 SFT steps on "What is the largest of 4, 0, 8, 1?" (about 73% right),
    its base, and prompt files (512 train, 256 held out)."""
    from posttrain.data.synthetic import make_prompt_rows, make_task_rows, write_jsonl
    from posttrain.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("largest")
    model = build_tiny_model(root / "tiny", split_digits=True)
    sft_rows = write_jsonl(make_task_rows(2000, seed=1, tasks=("largest",)), root / "sft.jsonl")
    sft = run({
        "model": {"name_or_path": str(model)}, "method": "sft", "tuning": {"mode": "full"},
        "data": {"train": str(sft_rows), "max_seq_len": 64, "packing": True, "cache_dir": str(root / "cache")},
        "training": {"max_steps": 80, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 20,
                     "logging_steps": 80, "progress_bar": False, "seed": 0},
        "output_dir": str(root / "sft"),
    })
    return {"root": root, "sft": sft, "base": model,
            "train": write_jsonl(make_prompt_rows(512, seed=5, tasks=("largest",)), root / "prompts.jsonl"),
            "eval": write_jsonl(make_prompt_rows(256, seed=6, tasks=("largest",)), root / "prompts_eval.jsonl")}
