"""posttrain export on the tiny model: merged LoRA equals the adapter, round trips, int8, and every refusal."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.export import export_model
from tests.conftest import base_config, run


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, task_data):
    """A 4-step LoRA SFT run (lr 1e-2, so the adapter visibly moves the logits); returns its output_dir."""
    out = tmp_path_factory.mktemp("export-lora") / "run"
    run(base_config(tiny_model, task_data["train"], out, tuning={"mode": "lora"}, training={"learning_rate": 1e-2}))
    return out


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, lora_run):
    pytest.importorskip("torchao")
    out = tmp_path_factory.mktemp("export-int8") / "int8"
    export_model(lora_run, out, quantize="int8", log=_quiet)
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    chats = [[{"role": "user", "content": "What is the largest of 7, 2, 9?"}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another one?"}]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts] + [tok("Once upon a time")["input_ids"]]


@torch.no_grad()
def _logits(model, prompts) -> torch.Tensor:
    return torch.cat([model(torch.tensor([ids]), use_cache=False).logits[0].float() for ids in prompts])


def _no_leftovers(folder):
    """atomic_dir and the quantization scratch write hidden siblings; none may survive."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_lora_run_exports_a_standalone_model_equal_to_the_adapter(lora_run, tiny_model, prompts, tmp_path):
    out = tmp_path / "merged"
    result = export_model(lora_run, out, log=_quiet)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_run / "final")
    exported = AutoModelForCausalLM.from_pretrained(out)
    want, got = _logits(adapter.eval(), prompts), _logits(exported, prompts)
    assert (got - want).abs().max() < 1e-5
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), prompts)
    assert (got - base).abs().max() > 1e-2  # the adapter's update is in the exported weights
    assert not (out / "adapter_config.json").exists() and "quantization_config" not in exported.config.to_dict()

    tok = AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    record = json.loads((out / "export.json").read_text())
    assert record == json.loads(json.dumps(result.record, default=str))
    assert record["source"] == {"path": str(lora_run / "final"), "kind": "adapter", "run_dir": str(lora_run),
                                "base_model": str(tiny_model)}
    v = record["verification"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 * v["scale"] and v["positions"] > 50
    assert record["generation"]["end_of_turn"] == "<|im_end|>" and record["dtype"] == "float32"
    assert _no_leftovers(tmp_path)


def test_full_run_round_trip_in_bfloat16_with_gguf(tiny_model, task_data, tmp_path):
    pytest.importorskip("gguf")
    final = run(base_config(tiny_model, task_data["train"], tmp_path / "run"))
    out = tmp_path / "bf16"
    record = export_model(tmp_path / "run", out, dtype="bfloat16", gguf=True, log=_quiet).record
    source = AutoModelForCausalLM.from_pretrained(final).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.dtype == torch.bfloat16
    for key, value in exported.state_dict().items():
        assert torch.equal(value, source[key].to(torch.bfloat16)), key
    assert record["source"]["kind"] == "model" and record["dtype"] == "bfloat16"
    assert record["verification"]["top1_agreement"] >= 0.9
    assert record["gguf"]["type"] == "BF16" and (out / "model.gguf").stat().st_size == record["gguf"]["bytes"]


def test_an_all_zero_adapter_is_refused_and_nothing_is_written(tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B starts at zero
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)
    with pytest.raises(PosttrainError, match="all 4 LoRA B matrices are zero"):
        export_model(adapter, tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_int8_export_reloads_quantized_and_agrees_with_the_float_model(int8_export, lora_run, tiny_model, prompts):
    from torchao.utils import TorchAOBaseTensor

    exported = AutoModelForCausalLM.from_pretrained(int8_export)
    assert isinstance(exported.model.layers[0].self_attn.q_proj.weight, TorchAOBaseTensor)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_run / "final").eval()
    want, got = _logits(adapter, prompts), _logits(exported, prompts)
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
    assert 0 < (want - got).abs().max() < 0.05 * want.abs().max()  # quantized: close, not equal
    size = (int8_export / "model.safetensors").stat().st_size
    assert size < 0.6 * (tiny_model / "model.safetensors").stat().st_size
    q = json.loads((int8_export / "export.json").read_text())["quantization"]
    assert q["method"] == "int8" and q["kept_in_float"] == ["lm_head"] and q["quantized_linear_layers"] == 14
    assert _no_leftovers(int8_export.parent)


def test_a_mismatching_reload_is_refused_and_the_old_export_kept(lora_run, tmp_path, monkeypatch):
    from posttrain.export import runner

    def corrupted(folder, dtype, quantize):
        model = real(folder, dtype, quantize)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.05)
        return model

    real = runner.load_exported
    monkeypatch.setattr(runner, "load_exported", corrupted)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(PosttrainError, match=r"verification failed, nothing was written.*max \|dlogit\| [0-9.e-]+ >"):
        export_model(lora_run, out, overwrite=True, log=_quiet)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _no_leftovers(tmp_path)


def test_cli_export_prints_where_and_the_verification(lora_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "verified against the source: max |dlogit|" in printed
    assert "stops at <|im_end|>, <|endoftext|> (eos_token_id [2, 0])" in printed
    assert (out / "model.safetensors").is_file()
    assert main(["export", str(lora_run), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; a GPU runs int4")
def test_int4_is_refused_without_cuda(lora_run, tmp_path, capsys):
    pytest.importorskip("torchao")
    assert main(["export", str(lora_run), "--out", str(tmp_path / "q4"), "--quantize", "int4"]) == 2
    assert "int4 needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "q4").exists()


def test_int4_config_fits_the_model(tiny_model):
    pytest.importorskip("torchao")
    from posttrain.export.quantize import torchao_config

    config = torchao_config("int4", AutoModelForCausalLM.from_pretrained(tiny_model))
    # input widths 64 (attention, gate/up) and 256 (down): 128 would leave most layers unquantized
    assert config.group_size == 64 and config.int4_packing_format == "tile_packed_to_4d"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao int4 kernels need CUDA")
def test_int4_export_on_gpu(lora_run, tmp_path):
    pytest.importorskip("torchao")
    record = export_model(lora_run, tmp_path / "q4", quantize="int4", log=_quiet).record
    assert record["dtype"] == "bfloat16" and record["quantization"]["method"] == "int4"
    assert record["quantization"]["group_size"] == 64 and record["verification"]["top1_agreement"] >= 0.8


def test_a_quantized_base_is_refused_and_a_quantization_config_alone_is_not(
        int8_export, lora_run, tiny_model, tmp_path):
    adapter = tmp_path / "adapter-on-int8"
    shutil.copytree(lora_run / "final", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(int8_export)}))
    with pytest.raises(PosttrainError, match=r"is stored quantized \(torchao: .* is I8\)"):
        export_model(adapter, tmp_path / "out", log=_quiet)

    # a config that asks to quantize at load time, over float weights: loaded unquantized
    base = tmp_path / "bnb-config"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    export_model(base, tmp_path / "plain", log=_quiet)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_non_finite_weights_are_refused(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "nan")
    with pytest.raises(PosttrainError, match=r"non-finite weights .* \(first: model.layers.1.mlp.up_proj.weight\)"):
        export_model(tmp_path / "nan", tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_inputs_that_are_not_models_and_unsafe_outputs_are_refused(lora_run, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(PosttrainError, match=r"notes is neither a training run"):
        export_model(tmp_path / "notes", tmp_path / "o", log=_quiet)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(PosttrainError, match=r"without a final/ model \(run.json status: failed\)"):
        export_model(tmp_path / "unfinished", tmp_path / "o", log=_quiet)
    with pytest.raises(PosttrainError, match="would replace"):
        export_model(lora_run, lora_run, overwrite=True, log=_quiet)
    assert (lora_run / "final" / "adapter_model.safetensors").is_file()


def test_gguf_of_another_architecture_is_refused_before_loading_weights(tiny_model, tmp_path):
    pytest.importorskip("gguf")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    logged = []
    with pytest.raises(PosttrainError, match="model_type is 'qwen2'"):
        export_model(tmp_path / "qwen", tmp_path / "out", gguf=True, log=logged.append)
    assert logged == [] and not (tmp_path / "out").exists()


def test_an_adapter_trained_on_an_adapter_stage_exports_the_whole_chain(lora_run, tiny_model, prompts, tmp_path):
    """LoRA DPO after LoRA SFT names the SFT adapter as its base: the export holds both, merged."""
    from posttrain.config import ModelConfig
    from posttrain.models.load import load_model

    sft = load_model(ModelConfig(name_or_path=str(lora_run / "final")))  # the SFT adapter merged
    torch.manual_seed(3)
    second = get_peft_model(sft, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    top = tmp_path / "second"
    second.save_pretrained(str(top))
    AutoTokenizer.from_pretrained(lora_run / "final").save_pretrained(str(top))
    assert json.loads((top / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lora_run / "final")

    export_model(top, tmp_path / "out", log=_quiet)
    exported = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), prompts)
    torch.testing.assert_close(exported, _logits(second.eval(), prompts), rtol=0, atol=1e-4)
    only_sft = _logits(load_model(ModelConfig(name_or_path=str(lora_run / "final"))), prompts)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), prompts)
    assert (exported - only_sft).abs().max() > 1e-3 and (exported - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind, files", [
    ("prompt", {"adapter_config.json": '{"peft_type": "PROMPT_TUNING", "base_model_name_or_path": "m"}'}),
    ("prefix", {"adapter_config.json": '{"peft_type": "PREFIX_TUNING", "base_model_name_or_path": "m"}'}),
    ("bottleneck", {"bottleneck_config.json": "{}"}),
])
def test_adapters_that_cannot_be_merged_are_refused_before_any_work(tmp_path, kind, files):
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "completed"}')
    for name, text in files.items():
        (run_dir / "final" / name).write_text(text)
    with pytest.raises(PosttrainError, match=f"holds a {kind} adapter, which cannot be merged"):
        export_model(run_dir, tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()
