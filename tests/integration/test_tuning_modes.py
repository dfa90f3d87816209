"""Each tuning mode trains exactly the parameters it should, compared before and after training."""

import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import base_config, run


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _state(model_dir) -> dict:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


@pytest.mark.parametrize(
    "mode, tuning, expect",
    [
        ("full", {}, lambda k: True),
        ("freeze", {"freeze": {"train_top_layers": 1}}, lambda k: ".layers.1." in k),
        ("freeze", {"freeze": {"train_modules": [r"\.mlp\.down_proj\."]}}, lambda k: "mlp.down_proj" in k),
    ],
)
def test_full_and_freeze(tmp_path, tiny_model, task_data, mode, tuning, expect):
    before = _state(tiny_model)
    final = run(base_config(tiny_model, task_data["train"], tmp_path / "o", tuning={"mode": mode, **tuning},
                            training={"max_steps": 3, "learning_rate": 1e-2}))
    after = _state(final)
    assert before.keys() == after.keys()
    # rotary buffers and the tied lm_head follow the embedding; compare parameters only
    expected = {k for k in before if expect(k)}
    assert _changed(before, after) == expected


def test_bitfit_trains_only_biases(tmp_path, tiny_model_with_biases, task_data):
    before = _state(tiny_model_with_biases)
    final = run(base_config(tiny_model_with_biases, task_data["train"], tmp_path / "o", tuning={"mode": "bitfit"},
                            training={"max_steps": 3, "learning_rate": 1e-2}))
    changed = _changed(before, _state(final))
    assert changed and all(k.endswith(".bias") for k in changed)
    assert changed == {k for k in before if k.endswith(".bias")}


def test_bitfit_on_a_model_without_biases_is_refused(tmp_path, tiny_model, task_data):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="no bias"):
        run(base_config(tiny_model, task_data["train"], tmp_path / "o", tuning={"mode": "bitfit"}))


def test_lora_trains_only_adapters(tmp_path, tiny_model, task_data):
    before = _state(tiny_model)
    final = run(base_config(tiny_model, task_data["train"], tmp_path / "o",
                            tuning={"mode": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                            training={"max_steps": 3, "learning_rate": 1e-2}))
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all(re.search(r"\.(q_proj|v_proj)\.lora_[AB]\.weight$", k) for k in adapter)
    # lora_B starts at zero; training moved it
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    assert _changed(before, {k: base[k] for k in before}) == set()
