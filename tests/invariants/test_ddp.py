"""Two CPU processes (DDP over gloo) train exactly like one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import base_config, losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cfg: dict, path, nproc: int) -> None:
    path.write_text(yaml.safe_dump(cfg))
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "posttrain", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_model, task_data):
    training = {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3}
    two = base_config(tiny_model, task_data["train"], tmp_path / "two", data={"packing": True}, training=training)
    one = base_config(tiny_model, task_data["train"], tmp_path / "one", data={"packing": True},
                      training={**training, "gradient_accumulation_steps": 2})
    _train(two, tmp_path / "two.yaml", nproc=2)
    _train(one, tmp_path / "one.yaml", nproc=1)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["devices"] == 2
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(a) == 6  # written once, by the main process only
    assert a == pytest.approx(b, rel=1e-5)
    wa = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_two_processes_equal_one_for_preference(tmp_path, sft_model, preference_data, method):
    """Reference log-probs precomputed by one rank for all; KTO's reference point summed over both ranks."""
    from tests.conftest import metrics, preference_config

    training = {"max_steps": 4, "batch_size": 4, "eval_steps": 4, "logging_steps": 1}
    two = preference_config(sft_model, preference_data, tmp_path / "two", method, training=training)
    one = preference_config(sft_model, preference_data, tmp_path / "one", method,
                            training={**training, "gradient_accumulation_steps": 2})
    # Each run scores its own reference (two processes split the rows), not one cache for both.
    one["data"]["cache_dir"] = str(tmp_path / "cache-one")
    _train(two, tmp_path / "two.yaml", nproc=2)
    _train(one, tmp_path / "one.yaml", nproc=1)
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-5)
    ea, eb = metrics(tmp_path / "two")[-1], metrics(tmp_path / "one")[-1]
    for key in ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy"):
        assert ea[key] == pytest.approx(eb[key], rel=1e-4, abs=1e-6), key
