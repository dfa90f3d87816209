"""The moe config section: typed, validated at load, impossible combinations refused with the fix."""

import pytest

from posttrain.config import MoeConfig, load_config
from posttrain.errors import ConfigError

BASE = {
    "model": {"name_or_path": "some/model"},
    "method": "sft",
    "data": {"train": "train.jsonl"},
    "output_dir": "out",
}


def _error(**sections) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, raw={**BASE, **sections})
    return str(info.value)


def test_defaults_and_overrides():
    cfg = load_config(None, raw=BASE)
    assert cfg.moe.is_default() and cfg.moe.aux_loss_coef is None and cfg.moe.aux_loss_scope == "micro_batch"
    cfg = load_config(None, raw=BASE, overrides=["moe.aux_loss_coef=1e-2", "moe.train_experts=[0, 2]",
                                                  "moe.freeze_router=true"])
    assert cfg.moe.aux_loss_coef == 0.01 and cfg.moe.train_experts == [0, 2] and cfg.moe.freeze_router
    assert not cfg.moe.is_default()


def test_bad_values_name_the_field():
    assert "moe.aux_loss_coef" in _error(moe={"aux_loss_coef": -1})
    assert "moe.aux_loss_scope" in _error(moe={"aux_loss_scope": "sequence"})
    assert "distinct" in _error(moe={"train_experts": [1, 1]})
    assert "moe.train_experts" in _error(moe={"train_experts": []})
    assert "moe.freeze_routers" in _error(moe={"freeze_routers": True})  # a typo is an error


def test_train_experts_needs_full_or_freeze_and_no_weight_decay():
    msg = _error(moe={"train_experts": [0]}, tuning={"mode": "lora"})
    assert "moe.train_experts" in msg and "tuning.mode full or freeze" in msg
    msg = _error(moe={"train_experts": [0]}, training={"weight_decay": 0.1})
    assert "training.weight_decay=0" in msg


def test_router_losses_are_refused_for_online_methods():
    online = {"method": "grpo", "online": {"rewards": [{"type": "exact_match"}]}, "data": {"train": "p.jsonl"}}
    assert "online trainer" in _error(**online, moe={"z_loss_coef": 1e-3})
    cfg = load_config(None, raw={**BASE, **online, "moe": {"freeze_router": True}})
    assert cfg.moe.freeze_router


def test_is_default_compares_values_not_what_was_written():
    # a resolved config.yaml spells every default out; it must still count as "no moe options" on a dense model
    assert MoeConfig(aux_loss_coef=None, z_loss_coef=0.0, aux_loss_scope="micro_batch", freeze_router=False,
                     train_experts=None, log_layer_loads=False).is_default()
    assert not MoeConfig(log_layer_loads=True).is_default()


def test_moe_options_on_an_unsupported_moe_architecture_are_refused_before_data_work(tmp_path):
    from transformers import AutoConfig

    from posttrain.trainers.moe import check_moe_config

    AutoConfig.for_model("granitemoe", num_local_experts=4, num_experts_per_tok=2).save_pretrained(tmp_path / "m")
    raw = {**BASE, "model": {"name_or_path": str(tmp_path / "m")}}
    check_moe_config(load_config(None, raw=raw))  # default moe options: it trains as a plain model
    with pytest.raises(ConfigError) as info:
        check_moe_config(load_config(None, raw={**raw, "moe": {"freeze_router": True}}))
    message = str(info.value)
    assert "moe: options are set (freeze_router=True)" in message and "(granitemoe)" in message
    assert "supported: mixtral, olmoe, qwen2_moe, qwen3_moe" in message and "remove the moe section" in message
