"""SFT and continued pretraining learn on the tiny model, on CPU, with fixed seeds."""

import json
import math

from tests.conftest import base_config, metrics, run


def test_sft_lowers_eval_loss(tmp_path, tiny_model, task_data):
    cfg = base_config(
        tiny_model, task_data["train"], tmp_path / "sft",
        data={"eval": str(task_data["eval"]), "packing": True},
        training={"max_steps": 120, "learning_rate": 3e-3, "warmup_steps": 10, "eval_steps": 40, "logging_steps": 10},
    )
    run(cfg)
    evals = [m["eval_loss"] for m in metrics(tmp_path / "sft") if "eval_loss" in m]
    assert len(evals) == 4  # before training, then at steps 40, 80, 120
    assert evals[-1] < 0.5 * evals[0], evals
    assert evals == sorted(evals, reverse=True), evals
    info = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 120


def test_pretraining_lowers_heldout_perplexity(tmp_path, tiny_model, domain_data):
    cfg = base_config(
        tiny_model, domain_data, tmp_path / "pt", method="pretrain",
        data={"train": [{"path": str(domain_data), "format": "text"}], "eval_fraction": 0.1, "packing": True,
              "max_seq_len": 128},
        training={"max_steps": 80, "learning_rate": 3e-3, "warmup_steps": 5, "eval_steps": 80, "logging_steps": 10},
    )
    run(cfg)
    ppl = [m["eval_ppl"] for m in metrics(tmp_path / "pt") if "eval_ppl" in m]
    assert ppl[0] > 500  # an untrained model over a 1024-token vocabulary
    assert ppl[-1] < 0.1 * ppl[0], ppl
    assert math.isclose(ppl[-1], math.exp([m for m in metrics(tmp_path / "pt") if "eval_ppl" in m][-1]["eval_loss"]))
