"""FSDP2 and DeepSpeed ZeRO on two CPU processes (gloo) train exactly like one process with the same global batch.

Losses, evaluations, checkpoints and final weights must match the one-process run; a sharded LoRA run saves the
whole adapter and resumes from its sharded state.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import base_config, losses, metrics, preference_config, run
from tests.invariants.test_ddp import _free_port, _train

ENGINES = {
    "fsdp": {"strategy": "fsdp"},
    "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
}
TRAINING = {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "lr_scheduler": "linear",
            "eval_steps": 2, "save_steps": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def small_eval(task_data, tmp_path_factory):
    """10 eval rows: 3 batches of 4, so one process evaluates two batches and the other one (plus a filler)."""
    rows = task_data["eval"].read_text().splitlines()[:10]
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(tiny_model, task_data, small_eval, out, training=None, **sections):
    data = {"packing": True, "eval": [str(small_eval)]}
    return base_config(tiny_model, task_data["train"], out, data=data, training={**TRAINING, **(training or {})},
                       **sections)


@pytest.fixture(scope="module")
def one_process(tiny_model, task_data, small_eval, tmp_path_factory):
    """The reference: one process, two accumulated micro-batches of 4 (the global batch of two processes)."""
    out = tmp_path_factory.mktemp("one") / "full"
    run(_config(tiny_model, task_data, small_eval, out, training={"gradient_accumulation_steps": 2}))
    return out


def _same_weights(a, b, name="model.safetensors"):
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def _launch_itself(cfg: dict, path) -> str:
    """`posttrain train` starting its own two processes (distributed.num_processes); its output."""
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path)], capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("engine", list(ENGINES))
def test_sharded_equals_one_process(tmp_path, tiny_model, task_data, small_eval, one_process, engine):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / engine
    cfg = _config(tiny_model, task_data, small_eval, out, distributed=ENGINES[engine])
    if engine == "fsdp":  # posttrain starts the processes itself, after tokenizing once
        cfg["distributed"] = {**cfg["distributed"], "num_processes": 2}  # ENGINES' own dict stays as it is
        printed = _launch_itself(cfg, tmp_path / "cfg.yaml")
        assert printed.index("tokenizing the data once") < printed.index("starting 2 processes")
        assert "tokenized data loaded from cache" in printed.split("starting 2 processes")[1]
    else:
        _train(cfg, tmp_path / "cfg.yaml", nproc=2)
    assert json.loads((out / "run.json").read_text())["devices"] == 2
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 3  # before training, at step 2 and at step 4
    assert evals == pytest.approx([m["eval_loss"] for m in metrics(one_process) if "eval_loss" in m], rel=1e-5)
    _same_weights(out / "final", one_process / "final")
    ckpt = out / "checkpoints" / "step-2"
    assert (ckpt / "state").is_dir()  # the engine's shards, for resume
    _same_weights(ckpt / "model", one_process / "checkpoints" / "step-2" / "model")


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_lora_saves_the_adapter_and_resumes(tmp_path, tiny_model, task_data, small_eval, engine):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    lora = {"tuning": {"mode": "lora", "lora": {"r": 4, "dropout": 0.0}}}  # dropout masks differ per process
    one = _config(tiny_model, task_data, small_eval, tmp_path / "one", training={"gradient_accumulation_steps": 2},
                  **lora)
    run(one)
    out = tmp_path / "two"
    _train(_config(tiny_model, task_data, small_eval, out, distributed=ENGINES[engine], **lora),
           tmp_path / "two.yaml", nproc=2)
    adapter = "adapter_model.safetensors"
    assert any("lora_A" in k for k in load_file(str(out / "final" / adapter)))
    _same_weights(out / "final", tmp_path / "one" / "final", adapter)
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)

    # Resume from the sharded state of step 2, as if the run had stopped there.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-2" / "model")  # resume must not need the gathered weights
    cfg = _config(tiny_model, task_data, small_eval, resumed, distributed=ENGINES[engine], **lora)
    (tmp_path / "resumed.yaml").write_text(yaml.safe_dump(cfg))
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    proc = subprocess.run([sys.executable, *launcher, "-m", "posttrain", "train", str(tmp_path / "resumed.yaml"),
                           "--resume"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(resumed) == pytest.approx(losses(out), rel=1e-6)
    _same_weights(resumed / "final", out / "final", adapter)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_under_fsdp_equals_one_process(tmp_path, sft_model, preference_data, method):
    """DPO's reference is scored before sharding; KTO's reference point sums both processes' forwards."""
    training = {"max_steps": 4, "batch_size": 13, "eval_steps": 4, "logging_steps": 1}
    two = preference_config(sft_model, preference_data, tmp_path / "two", method, training=training,
                            distributed={"strategy": "fsdp"})
    one = preference_config(sft_model, preference_data, tmp_path / "one", method,
                            training={**training, "gradient_accumulation_steps": 2})
    one["data"]["cache_dir"] = str(tmp_path / "cache-one")
    _train(two, tmp_path / "two.yaml", nproc=2)
    run(one)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    ea, eb = metrics(tmp_path / "two")[-1], metrics(tmp_path / "one")[-1]
    for key in ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy"):
        assert ea[key] == pytest.approx(eb[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_an_engine_on_one_process_without_a_launcher(tmp_path, tiny_model, task_data, small_eval, one_process,
                                                     engine):
    """A group of one is formed for the engine (FSDP or ZeRO with CPU offload on a single GPU)."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / engine
    cfg = _config(tiny_model, task_data, small_eval, out, training={"gradient_accumulation_steps": 2},
                  distributed=ENGINES[engine])
    _train(cfg, tmp_path / "cfg.yaml", nproc=1)
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    _same_weights(out / "final", one_process / "final")
