"""Tuning modes: the config refusals, the bottleneck transform, and the virtual-token alignment."""

import copy
import json

import pytest
import torch

from posttrain.config import ADAPTER_MODES, PROMPT_MODES, TuningConfig, load_config
from posttrain.errors import ConfigError, PosttrainError

BASE = {
    "model": {"name_or_path": "some/model"},
    "method": "sft",
    "data": {"train": [{"path": "train.jsonl", "format": "messages"}]},
    "output_dir": "out",
}


def cfg(**sections):
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return load_config(None, raw=raw)


def refused(**sections) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(**sections)
    return str(info.value)


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_packing_is_refused_with_prompt_learning(mode):
    msg = refused(tuning={"mode": mode}, data={"packing": True})
    assert f"data.packing=true cannot be used with tuning.mode={mode} (method sft)" in msg
    assert "data.packing=false" in msg
    cfg(tuning={"mode": mode}, data={"packing": True}, method="dpo")  # only pretrain and SFT pack
    cfg(tuning={"mode": "bottleneck"}, data={"packing": True})


@pytest.mark.parametrize("mode", ["prefix", "ptuning_v2"])
def test_gradient_checkpointing_is_refused_with_prefix_tuning(mode):
    msg = refused(tuning={"mode": mode}, training={"gradient_checkpointing": True})
    assert f"tuning.mode={mode}" in msg and "key/value cache" in msg
    cfg(tuning={"mode": "prompt"}, training={"gradient_checkpointing": True})


@pytest.mark.parametrize("mode", [*PROMPT_MODES, "bottleneck", "qlora"])
def test_reward_models_refuse_modes_that_cannot_be_merged(mode):
    msg = refused(method="reward", tuning={"mode": mode})
    assert f"method reward cannot use tuning.mode={mode}" in msg and "merged" in msg


def test_reward_models_accept_ia3_and_the_lora_variants():
    cfg(method="reward", tuning={"mode": "ia3"})
    cfg(method="reward", tuning={"mode": "lora", "lora": {"use_dora": True, "train_embeddings": True}})


def test_vllm_is_refused_for_modes_it_cannot_sample_from():
    online = {"rewards": [{"type": "exact_match"}], "generation": {"engine": "vllm"}}
    msg = refused(method="grpo", tuning={"mode": "prompt"}, online=online)
    assert "engine=vllm cannot sample from tuning.mode=prompt (method grpo)" in msg
    cfg(method="grpo", tuning={"mode": "lora"}, online=online)


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_every_adapter_mode_takes_the_adapters_off_reference(mode):
    assert cfg(method="dpo", tuning={"mode": mode}).reference_mode() == "adapters_off"
    assert cfg(method="dpo", tuning={"mode": mode}, preference={"reference": "adapters_off"}).reference_mode() == \
        "adapters_off"


def test_lora_training_embeddings_loads_the_base_in_float32():
    """peft's full copies of the embeddings take the base's dtype: a bf16 base would train them without fp32 masters."""
    from posttrain.trainers.stage import _model_config

    assert _model_config(cfg(tuning={"mode": "lora", "lora": {"train_embeddings": True}})).dtype == "float32"
    assert _model_config(cfg(tuning={"mode": "lora"})).dtype == "auto"
    kept = cfg(tuning={"mode": "lora", "lora": {"train_embeddings": True}}, model={"name_or_path": "m",
                                                                                  "dtype": "bfloat16"})
    assert _model_config(kept).dtype == "bfloat16"  # a dtype the user chose is kept


def test_adapters_off_is_refused_without_adapters():
    msg = refused(method="dpo", tuning={"mode": "full"}, preference={"reference": "adapters_off"})
    assert "needs tuning.mode=lora or another mode" in msg and "bottleneck" in msg


@pytest.mark.parametrize("peft_type, online", [("PROMPT_TUNING", False), ("PREFIX_TUNING", True)])
def test_a_start_that_stays_an_adapter_takes_another_reference(tmp_path, peft_type, online):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "base_model_name_or_path": "b"}))
    method = {"method": "grpo", "online": {"rewards": [{"type": "exact_match"}], "grpo": {"kl_coef": 0.1}}} \
        if online else {"method": "dpo"}
    c = cfg(model={"name_or_path": str(tmp_path)}, tuning={"mode": "prompt"}, **method)
    assert c.reference_mode() == ("live" if online else "precomputed")
    msg = refused(model={"name_or_path": str(tmp_path)}, tuning={"mode": "prompt"},
                  preference={"reference": "adapters_off"}, **method)
    assert "bare base" in msg
    # A LoRA adapter folder is merged when loaded: its base keeps the adapters-off reference.
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"}))
    assert cfg(model={"name_or_path": str(tmp_path)}, tuning={"mode": "lora"}, **method).reference_mode() \
        == "adapters_off"


def test_tuning_option_checks():
    assert "ptuning_v2 is prefix tuning without the projection" in refused(
        tuning={"mode": "ptuning_v2", "prefix": {"projection": True}})
    assert "needs tuning.prefix.projection=true" in refused(
        tuning={"mode": "ptuning_v2", "prefix": {"encoder_hidden_size": 32}})
    assert "needs tuning.prompt.init_text" in refused(tuning={"mode": "prompt", "prompt": {"init": "text"}})
    assert "used only with init=text" in refused(tuning={"mode": "prompt", "prompt": {"init_text": "hello"}})
    assert "must be among target_modules" in refused(
        tuning={"mode": "ia3", "ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}})
    assert "repeated" in refused(tuning={"mode": "bottleneck", "bottleneck": {"after": ["mlp", "mlp"]}})
    assert "tuning.mode" in refused(tuning={"mode": "adapters"})
    assert TuningConfig(mode="prefix").prefix_projection() and not TuningConfig(mode="ptuning_v2").prefix_projection()


# --- bottleneck adapters ---------------------------------------------------------------------------------


@pytest.fixture()
def fresh(model):
    return copy.deepcopy(model).eval()


def _randomize(module, scale=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


IDS = torch.tensor([[5, 17, 42, 99, 7, 300], [8, 9, 10, 11, 12, 13]])


@torch.no_grad()
def _logits(m):
    return m(input_ids=IDS, use_cache=False).logits


def test_bottleneck_starts_as_the_base_trains_only_itself_and_switches_off(model, fresh):
    from posttrain.tuning import adapters_disabled, apply_tuning, count_parameters
    from posttrain.tuning.bottleneck import find_adapters

    base = _logits(model)
    tuned = apply_tuning(fresh, TuningConfig(mode="bottleneck", bottleneck={"size": 8}))
    torch.testing.assert_close(_logits(tuned), base, rtol=0, atol=0)  # up-projections start at zero
    holder = find_adapters(tuned)
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == \
        [f"bottleneck_adapters.{n}" for n, _ in holder.named_parameters()]
    layers = tuned.config.num_hidden_layers
    assert count_parameters(tuned)[0] == layers * 2 * (64 * 8 + 8 + 8 * 64 + 64)
    _randomize(holder)
    assert (_logits(tuned) - base).abs().max() > 1e-2
    with adapters_disabled(tuned):
        torch.testing.assert_close(_logits(tuned), base, rtol=0, atol=0)
    assert (_logits(tuned) - base).abs().max() > 1e-2


def test_bottleneck_after_mlp_only_and_a_deep_copy_uses_its_own_adapters(model, fresh):
    from posttrain.tuning import apply_tuning
    from posttrain.tuning.bottleneck import find_adapters

    tuned = apply_tuning(fresh, TuningConfig(mode="bottleneck", bottleneck={"after": ["mlp"]}))
    assert all(set(d) == {"mlp"} for d in find_adapters(tuned).layers)
    twin = copy.deepcopy(tuned)
    _randomize(find_adapters(twin))
    torch.testing.assert_close(_logits(tuned), _logits(model), rtol=0, atol=0)
    assert (_logits(twin) - _logits(model)).abs().max() > 1e-2


def test_bottleneck_save_and_load_onto_a_fresh_base(model, fresh, tmp_path):
    from posttrain.tuning import apply_tuning
    from posttrain.tuning.bottleneck import find_adapters, load_bottleneck, read_spec, save_bottleneck

    tuned = apply_tuning(fresh, TuningConfig(mode="bottleneck", bottleneck={"activation": "gelu"}))
    _randomize(find_adapters(tuned))
    save_bottleneck(tuned, tmp_path)
    spec = read_spec(tmp_path)
    assert spec["size"] == 64 // 16 and spec["sublayers"] == {"attention": "self_attn", "mlp": "mlp"}
    loaded = load_bottleneck(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(PosttrainError, match="already has bottleneck adapters"):
        load_bottleneck(loaded, tmp_path)


def test_bottleneck_needs_transformer_layers():
    from posttrain.config import BottleneckConfig
    from posttrain.tuning.bottleneck import make_spec

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="found no transformer layers"):
        make_spec(Flat(), BottleneckConfig())


# --- virtual tokens ----------------------------------------------------------------------------------------


def test_virtual_token_logits_line_up_with_the_input_and_packed_rows_are_refused(fresh):
    from posttrain.tuning import apply_tuning

    tuned = apply_tuning(fresh, TuningConfig(mode="prompt", prompt={"num_virtual_tokens": 5}))
    out = tuned(input_ids=IDS, attention_mask=torch.ones_like(IDS), position_ids=torch.arange(6).expand(2, -1))
    assert out.logits.shape[:2] == IDS.shape
    with torch.no_grad():
        raw = tuned.base_model(inputs_embeds=torch.cat(
            [tuned.get_prompt(2), tuned.get_base_model().get_input_embeddings()(IDS)], 1)).logits
    torch.testing.assert_close(out.logits, raw[:, 5:], rtol=1e-6, atol=1e-6)
    with pytest.raises(PosttrainError, match="packed rows"):
        tuned(input_ids=IDS, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))


def test_a_kept_adapter_is_part_of_the_reference_fingerprint(model):
    from posttrain.trainers.reference import weights_fingerprint
    from posttrain.tuning import apply_tuning

    a = apply_tuning(copy.deepcopy(model), TuningConfig(mode="prompt", prompt={"num_virtual_tokens": 2}))
    b = apply_tuning(copy.deepcopy(model), TuningConfig(mode="prompt", prompt={"num_virtual_tokens": 2}))
    _randomize(b.prompt_encoder)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(model) == weights_fingerprint(copy.deepcopy(model))
