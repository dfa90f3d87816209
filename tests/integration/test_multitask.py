"""Multi-task SFT on the tiny model: mixed epochs, per-task losses that add up, and the loop's invariants kept."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import posttrain.trainers.loop as loop
from posttrain.data.synthetic import make_general_corpus, make_task_rows, write_jsonl
from tests.conftest import base_config, losses, metrics, run


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    """120 "add" and 30 "upper" rows (messages) and 10 "reverse" rows (multitask format); held-out rows of each."""
    root = tmp_path_factory.mktemp("multitask")

    def multitask(n, seed):
        return [{"task": "reverse", "instruction": r["messages"][0]["content"], "input": "now", "output": r["answer"]}
                for r in make_task_rows(n, seed=seed, tasks=("reverse",))]

    train = make_task_rows(120, seed=0, tasks=("add",)) + make_task_rows(30, seed=1, tasks=("upper",))
    return {
        "train": write_jsonl(train, root / "train.jsonl"),
        "reverse": write_jsonl(multitask(10, seed=2), root / "reverse.jsonl"),
        "eval": write_jsonl(make_task_rows(16, seed=50, tasks=("add", "upper")), root / "eval.jsonl"),
        "eval_reverse": write_jsonl(multitask(8, seed=51), root / "eval_reverse.jsonl"),
        "text": write_jsonl([{"text": t} for t in make_general_corpus(60, seed=0)], root / "text.jsonl"),
        "sizes": {"add": 120, "reverse": 10, "upper": 30},
    }


def _sources(tasks: dict) -> list:
    return [str(tasks["train"]), {"path": str(tasks["reverse"]), "format": "multitask"}]


def test_temperature_mixing_per_task_losses_add_up_and_every_task_learns(tmp_path, tiny_model, tasks, monkeypatch):
    seen: list[list[int]] = []
    real_step = loop.Trainer._train_step

    def record(self, batch):
        seen.append([self.train_set.row_tasks()[r] for r in batch])
        return real_step(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", record)
    out = tmp_path / "mt"
    cfg = base_config(
        tiny_model, tasks["train"], out,
        data={"train": _sources(tasks), "eval": [str(tasks["eval"]),
                                                  {"path": str(tasks["eval_reverse"]), "format": "multitask"}],
              "mixing": {"strategy": "temperature", "temperature": 2.0}},
        training={"max_steps": 40, "learning_rate": 3e-3, "warmup_steps": 5, "eval_steps": 40, "logging_steps": 1},
    )
    run(cfg)
    names = ["add", "reverse", "upper"]
    # 160 rows: the 40 steps of 8 rows are two whole epochs, so the shares hold up to whole-row rounding.
    weights = {t: tasks["sizes"][t] ** (1 / 2.0) for t in names}
    counts = Counter(names[t] for batch in seen for t in batch)
    assert sum(counts.values()) == 320
    for t in names:
        assert counts[t] / 320 == pytest.approx(weights[t] / sum(weights.values()), abs=1 / 160), counts
    assert counts["reverse"] > 2 * 10 * 320 / 320  # the 10-row task comes more often than its size would give

    logged = [m for m in metrics(out) if "loss" in m]
    assert len(logged) == 40
    for m in logged:
        shares = {t: m[f"token_share/{t}"] for t in names}
        assert sum(shares.values()) == pytest.approx(1.0)
        assert sum(shares[t] * m[f"loss/{t}"] for t in names if shares[t] > 0) == pytest.approx(m["loss"], rel=1e-6)
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 2  # before training and at the end
    for e in evals:
        assert sum(e[f"eval_token_share/{t}"] * e[f"eval_loss/{t}"] for t in names) == pytest.approx(e["eval_loss"],
                                                                                                    rel=1e-6)
    # Every task's held-out loss falls (measured 6.9 -> 3.0 add, 6.9 -> 5.2 upper, 6.9 -> 5.8 reverse).
    for t in names:
        assert evals[-1][f"eval_loss/{t}"] < 0.9 * evals[0][f"eval_loss/{t}"], (t, evals[-1])


def _short(tiny_model, tasks, out, **training) -> dict:
    return base_config(
        tiny_model, tasks["train"], out,
        data={"train": _sources(tasks), "packing": True, "mixing": {"strategy": "equal"},
              "replay": {"sources": [{"path": str(tasks["text"]), "format": "text"}], "fraction": 0.25}},
        training={"learning_rate": 3e-3, "l2_to_start": 0.5, **training},
    )


def _weights(final):
    return load_file(str(final / "model.safetensors"))


def test_mixing_replay_and_l2_keep_accumulation_equal_to_one_batch(tmp_path, tiny_model, tasks):
    one = run(_short(tiny_model, tasks, tmp_path / "one", max_steps=5, batch_size=8))
    four = run(_short(tiny_model, tasks, tmp_path / "four", max_steps=5, batch_size=2, gradient_accumulation_steps=4))
    a, b = metrics(one.parent), metrics(four.parent)
    assert len(a) == 5
    for ma, mb in zip(a, b):
        for k in ("loss", "loss/replay", "token_share/replay", "l2_penalty"):
            if k in ma or k in mb:
                assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-9), k
    assert a[-1]["l2_penalty"] > 0 and "loss/replay" in json.dumps(a)
    wa, wb = _weights(one), _weights(four)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4)


def test_resume_with_mixing_replay_and_l2_equals_uninterrupted(tmp_path, tiny_model, tasks, monkeypatch):
    def config(name):
        return _short(tiny_model, tasks, tmp_path / name, max_steps=12, batch_size=4, save_steps=6)

    whole = run(config("whole"))
    real_step = loop.Trainer._train_step

    def crash(self, batch):
        if self.state.step == 8:
            raise Crash()
        return real_step(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", crash)
    with pytest.raises(Crash):
        run(config("split"))
    monkeypatch.setattr(loop.Trainer, "_train_step", real_step)
    resumed = run(config("split"), resume=True)
    a, b = metrics(whole.parent), metrics(resumed.parent)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert losses(whole.parent) == pytest.approx(losses(resumed.parent), rel=1e-6)
    # The anchor is the stage's start, not the checkpoint the run resumed from.
    assert [m["l2_penalty"] for m in a] == pytest.approx([m["l2_penalty"] for m in b], rel=1e-5)
    wa, wb = _weights(whole), _weights(resumed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_l2_to_start_keeps_lora_adapters_near_their_init(tmp_path, tiny_model, tasks):
    def config(name, coef):
        return base_config(tiny_model, tasks["train"], tmp_path / name, tuning={"mode": "lora", "lora": {"r": 4}},
                           training={"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "l2_to_start": coef,
                                     "logging_steps": 4})

    free = run(config("free", 0.0))
    held = run(config("held", 50.0))

    def b_norm(final):  # LoRA's B starts at zero: its norm is its distance from the init
        w = load_file(str(final / "adapter_model.safetensors"))
        return float(torch.sqrt(sum((v.float() ** 2).sum() for k, v in w.items() if "lora_B" in k)))

    assert b_norm(held) < 0.5 * b_norm(free), (b_norm(held), b_norm(free))
    logged = [m for m in metrics(held.parent) if "l2_distance" in m]
    assert len(logged) == 3 and all(m["l2_distance"] > 0 for m in logged)
    assert "l2_distance" not in json.dumps(metrics(free.parent))


def test_resumed_lora_keeps_the_l2_anchor_of_the_stage_start(tmp_path, tiny_model, tasks, monkeypatch):
    import posttrain.tuning as tuning

    def config(name):
        return base_config(tiny_model, tasks["train"], tmp_path / name, tuning={"mode": "lora", "lora": {"r": 4}},
                           training={"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "l2_to_start": 5.0,
                                     "logging_steps": 1, "save_steps": 3})

    whole = run(config("whole"))
    real_step, real_tuning = loop.Trainer._train_step, tuning.apply_tuning

    def crash(self, batch):
        if self.state.step == 4:
            raise Crash()
        return real_step(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", crash)
    with pytest.raises(Crash):
        run(config("split"))
    monkeypatch.setattr(loop.Trainer, "_train_step", real_step)

    def redrawn(*args, **kwargs):  # a resume whose RNG differs when LoRA's A is drawn (e.g. no eval.before)
        torch.rand(1000)
        return real_tuning(*args, **kwargs)

    monkeypatch.setattr(tuning, "apply_tuning", redrawn)
    resumed = run(config("split"), resume=True)
    a, b = metrics(whole.parent), metrics(resumed.parent)
    assert [m["l2_penalty"] for m in a] == pytest.approx([m["l2_penalty"] for m in b], rel=1e-5)
    assert a[-1]["l2_penalty"] > 0
