"""Saved models reload with identical logits: full weights through transformers, adapters through peft."""

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import TuningConfig
from posttrain.models.checkpoint import load_weights, save_model
from posttrain.tuning import apply_tuning


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_full_save_reload_equal_logits(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = _perturbed(AutoModelForCausalLM.from_pretrained(tiny_model)).eval()
    ids = torch.tensor([tok("What is 12 + 30? 42")["input_ids"]])
    save_model(model, tok, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert not torch.allclose(_logits(fresh, ids), _logits(model, ids))
    load_weights(fresh, tmp_path / "m")  # the resume path
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=0)


def test_lora_save_reload_equal_logits(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = _perturbed(apply_tuning(AutoModelForCausalLM.from_pretrained(tiny_model), TuningConfig(mode="lora"))).eval()
    ids = torch.tensor([tok("reverse the word abc: cba")["input_ids"]])
    save_model(model, tok, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-6, atol=1e-6)
    fresh = apply_tuning(AutoModelForCausalLM.from_pretrained(tiny_model), TuningConfig(mode="lora")).eval()
    load_weights(fresh, tmp_path / "a")
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=1e-6, atol=1e-6)


def test_refuses_to_save_non_finite_weights(tmp_path, tiny_model):
    import pytest

    from posttrain.errors import PosttrainError

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PosttrainError, match="non-finite"):
        save_model(model, tok, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_loading_weights_with_a_missing_tensor_is_refused(tmp_path, tiny_model):
    import pytest
    from safetensors.torch import load_file, save_file

    from posttrain.errors import PosttrainError

    state = load_file(str(tiny_model / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    (tmp_path / "partial").mkdir()
    save_file(state, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(PosttrainError, match="up_proj"):
        load_weights(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "partial")


def test_a_lora_run_output_loads_as_the_merged_model(tmp_path, tiny_model, task_data):
    """A later stage that starts from a LoRA run's final/ starts from the adapted model, not the bare base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.config import ModelConfig
    from posttrain.models.load import load_model
    from tests.conftest import base_config, run

    final = run(base_config(tiny_model, task_data["train"], tmp_path / "lora",
                            tuning={"mode": "lora", "lora": {"dropout": 0.0}},
                            training={"max_steps": 10, "learning_rate": 1e-2}))
    assert (final / "adapter_config.json").is_file()
    merged = load_model(ModelConfig(name_or_path=str(final))).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(final)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    x = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, rtol=1e-4, atol=1e-4)
        assert (base(x).logits - adapted(x).logits).abs().max() > 1e-2
