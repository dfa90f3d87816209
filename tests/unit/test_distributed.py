"""The distributed: section: what is refused, the DeepSpeed JSON, the launcher's choice and command line."""

import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.trainers.launch import launch_command, wants_launch
from posttrain.trainers.parallel import deepspeed_config, meta_copy, resolve_strategy
from tests.conftest import base_config


def _cfg(tmp_path, **sections):
    return load_config(None, raw=base_config(Path("model"), Path("train.jsonl"), tmp_path / "out", **sections))


@pytest.mark.parametrize("sections, words", [
    ({"method": "grpo", "online": {"rewards": [{"type": "exact_match"}]}}, "method grpo"),
    ({"tuning": {"mode": "prompt"}, "data": {"packing": False}}, "tuning.mode=prompt"),
    ({"training": {"l2_to_start": 0.1}}, "training.l2_to_start"),
    ({"eval": {"suites": [{"name": "g", "type": "generation", "path": "x.jsonl"}], "every_steps": 5}},
     "eval.every_steps"),
])
@pytest.mark.parametrize("engine", [{"strategy": "fsdp"}, {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}])
def test_what_sharding_cannot_train_is_refused_at_load(tmp_path, sections, words, engine):
    with pytest.raises(ConfigError, match="distributed.strategy=") as err:
        _cfg(tmp_path, distributed=engine, **sections)
    assert words in str(err.value)


def test_zero2_keeps_whole_weights_so_eval_every_steps_is_allowed(tmp_path):
    evals = {"suites": [{"name": "g", "type": "generation", "path": "x.jsonl"}], "every_steps": 5}
    cfg = _cfg(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}, eval=evals)
    assert cfg.eval.every_steps == 5


def test_machines_need_an_address_and_a_rank_below_their_count(tmp_path):
    with pytest.raises(ConfigError, match="main_process_ip"):
        _cfg(tmp_path, distributed={"num_machines": 2, "num_processes": 8})
    with pytest.raises(ConfigError, match="machine_rank=2"):
        _cfg(tmp_path, distributed={"num_machines": 2, "machine_rank": 2, "num_processes": 8,
                                    "main_process_ip": "10.0.0.1"})
    with pytest.raises(ConfigError, match="zero_stage 3"):
        _cfg(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": {"offload_params": True}})


def test_deepspeed_json_takes_the_loop_settings_and_merges_the_users_file(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True},
                                 "train_micro_batch_size_per_gpu": "auto"}))
    cfg = _cfg(tmp_path, training={"batch_size": 3, "gradient_accumulation_steps": 5, "max_grad_norm": 0.5,
                                   "mixed_precision": "bf16"},
               distributed={"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "offload_optimizer": True,
                                                                    "config_file": str(extra)}})
    ds = deepspeed_config(cfg, 3)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    # The stage is ours; the user's other ZeRO keys survive the merge.
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}

    extra.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        deepspeed_config(cfg, 3)


def test_auto_follows_the_launcher_and_an_explicit_strategy_must_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert resolve_strategy(_cfg(tmp_path)) == ("deepspeed", 3)
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ  # accelerate must not wrap the model a second time

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="distributed.strategy is ddp"):
        resolve_strategy(_cfg(tmp_path, distributed={"strategy": "ddp"}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="chosen by `accelerate launch`"):
        resolve_strategy(_cfg(tmp_path, training={"l2_to_start": 0.1}))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert resolve_strategy(_cfg(tmp_path)) == ("ddp", 2)  # nothing asked for: DDP


def test_launch_only_outside_a_launcher_and_with_the_machines_flags(tmp_path, monkeypatch):
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "POSTTRAIN_LAUNCHED"):
        monkeypatch.delenv(var, raising=False)
    one = _cfg(tmp_path)
    two = _cfg(tmp_path, distributed={"num_processes": 2})
    assert not wants_launch(one) and wants_launch(two)
    monkeypatch.setenv("POSTTRAIN_LAUNCHED", "1")  # a process the launch started never launches again
    assert not wants_launch(two)

    nodes = _cfg(tmp_path, distributed={"num_processes": 8, "num_machines": 2, "machine_rank": 1,
                                        "main_process_ip": "10.0.0.1"})
    cmd = launch_command(nodes, ["train", "c.yaml"])
    flags = dict(zip(cmd[3:-4:2], cmd[4:-4:2]))
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "10.0.0.1" and flags["--main_process_port"] == "29500"
    assert cmd[-4:] == ["-m", "posttrain", "train", "c.yaml"]


def test_meta_copy_keeps_structure_and_ties_without_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert not skeleton.model.layers[0].mlp.up_proj.weight.requires_grad
    assert all(not p.is_meta for p in model.parameters())  # the original is untouched
    assert torch.equal(skeleton.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
