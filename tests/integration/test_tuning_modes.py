"""Each tuning mode trains exactly the parameters it should, compared before and after training.

The adapter modes (DoRA, rsLoRA, LoRA + embeddings, prompt learning, IA3, bottleneck) also learn, save and
reload with equal logits, keep the base as their adapters-off reference, and run DPO and GRPO; the
combinations that cannot work are refused (docs/tuning.md).
"""

import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.config import ModelConfig, load_config
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.load import load_model
from tests.conftest import base_config, losses, metrics, preference_config, run


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


# --- the adapter modes: DoRA, rsLoRA, LoRA + embeddings, prompt learning, IA3, bottleneck ---------------------


def _prompt_encoder(key: str) -> bool:
    return key.startswith("prompt_encoder.")


# name -> (tuning section, learning rate, which state-dict entries are the mode's own parameters)
MODES = {
    "dora": ({"mode": "lora", "lora": {"r": 4, "use_dora": True}}, 1e-2, lambda k: ".lora_" in k),
    "rslora": ({"mode": "lora", "lora": {"r": 4, "use_rslora": True}}, 1e-2, lambda k: ".lora_" in k),
    "lora_embeddings": ({"mode": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                                  "train_embeddings": True}},
                        1e-2, lambda k: ".lora_" in k or ".modules_to_save." in k),
    "prompt": ({"mode": "prompt", "prompt": {"num_virtual_tokens": 8}}, 0.1, _prompt_encoder),
    "ptuning": ({"mode": "ptuning", "ptuning": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}}, 1e-2,
                _prompt_encoder),
    "prefix": ({"mode": "prefix", "prefix": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}}, 1e-2,
               _prompt_encoder),
    "ptuning_v2": ({"mode": "ptuning_v2", "prefix": {"num_virtual_tokens": 8}}, 0.1, _prompt_encoder),
    "ia3": ({"mode": "ia3"}, 0.1, lambda k: ".ia3_l." in k),
    "bottleneck": ({"mode": "bottleneck"}, 1e-2, lambda k: k.startswith("bottleneck_adapters.")),
}
VIRTUAL = ("prompt", "ptuning")


@pytest.fixture
def captured(monkeypatch):
    """The model a run trains, as ``apply_tuning`` returned it, and its state dict at that moment."""
    from posttrain import tuning

    box = {}
    real = tuning.apply_tuning

    def capture(model, cfg, task_type="CAUSAL_LM"):
        model = real(model, cfg, task_type)
        box["model"], box["before"] = model, {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(tuning, "apply_tuning", capture)
    return box


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(5, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model, batch):
    return model(**batch, use_cache=False).logits


def _library_load(final, base_dir):
    """The saved adapter loaded by its own library's loader, without posttrain's load path."""
    if (final / "bottleneck_config.json").is_file():
        from posttrain.tuning.bottleneck import load_bottleneck

        return load_bottleneck(AutoModelForCausalLM.from_pretrained(base_dir), final)
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(final)


@pytest.mark.parametrize("name", list(MODES))
def test_adapter_mode_trains_only_its_parameters_learns_and_reloads(tmp_path, tiny_model, task_data, captured, name):
    tuning, lr, own = MODES[name]
    out = tmp_path / name
    final = run(base_config(tiny_model, task_data["train"], out, tuning=tuning, data={"eval": str(task_data["eval"])},
                            training={"max_steps": 12, "learning_rate": lr, "eval_steps": 12}))
    model, before = captured["model"], captured["before"]
    after = model.state_dict()
    # Every parameter of the mode moved; every other entry (the base) is bit-identical.
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if own(k)} and changed
    assert {k for k in after if not own(k)}

    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.02, evals

    batch = _batch()
    expected = _logits(model.eval(), batch)
    assert expected.shape[1] == batch["input_ids"].shape[1]  # no virtual positions left in front
    ours = load_model(ModelConfig(name_or_path=str(final))).eval()
    torch.testing.assert_close(_logits(ours, batch), expected, atol=2e-5, rtol=1e-5)
    theirs = _logits(_library_load(final, tiny_model).eval(), batch)
    n_virtual = 8 if name in VIRTUAL else 0
    assert theirs.shape[1] == batch["input_ids"].shape[1] + n_virtual
    torch.testing.assert_close(theirs[:, n_virtual:], expected, atol=2e-5, rtol=1e-5)


def test_lora_variants_reach_peft(tmp_path, tiny_model, task_data):
    out = {}
    for name in ("dora", "rslora", "lora_embeddings"):
        out[name] = run(base_config(tiny_model, task_data["train"], tmp_path / name, tuning=MODES[name][0],
                                    training={"max_steps": 1}))
    config = {n: json.loads((f / "adapter_config.json").read_text()) for n, f in out.items()}
    assert config["dora"]["use_dora"] and not config["dora"]["use_rslora"]
    assert config["rslora"]["use_rslora"] and not config["rslora"]["use_dora"]
    assert any("lora_magnitude_vector" in k for k in load_file(str(out["dora"] / "adapter_model.safetensors")))
    saved = load_file(str(out["lora_embeddings"] / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in saved) and config["lora_embeddings"]["ensure_weight_tying"]


def test_first_sft_loss_of_a_prompt_tuned_model_is_the_loss_without_virtual_positions(
        tmp_path, tiny_model, task_data, captured, monkeypatch):
    import torch.nn.functional as F
    from peft import PromptTuningConfig, get_peft_model

    from posttrain.trainers.supervised import SupervisedMethod

    seen = []
    real_loss = SupervisedMethod.loss

    def record(self, model, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return real_loss(self, model, batch)

    monkeypatch.setattr(SupervisedMethod, "loss", record)
    out = tmp_path / "o"
    run(base_config(tiny_model, task_data["train"], out, tuning={"mode": "prompt", "prompt": {"num_virtual_tokens": 8}},
                    training={"max_steps": 1}))
    logged = losses(out)[0]

    # By hand: a fresh peft model with the same starting prompt, its raw logits, the first 8 positions dropped.
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    start = captured["before"]["prompt_encoder.default.embedding.weight"]
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(start)
    batch = seen[0]
    with torch.no_grad():
        raw = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert raw.shape[1] == batch["input_ids"].shape[1] + 8
    logits = raw[:, 8:]
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                              ignore_index=-100)
    assert logged == pytest.approx(float(by_hand), rel=1e-5)
    # Scored with the virtual positions left in, the loss would be another number.
    shifted = F.cross_entropy(raw[:, : batch["labels"].shape[1] - 1].reshape(-1, raw.shape[-1]),
                              batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(shifted) - logged) > 1e-3


def _tuning_for(name: str) -> dict:
    tuning = json.loads(json.dumps(MODES[name][0]))
    if tuning["mode"] == "lora":
        tuning["lora"]["dropout"] = 0.0
    return tuning


@pytest.mark.parametrize("name", list(MODES))
def test_adapters_off_reference_is_the_base_model(sft_model, name):
    from transformers import AutoTokenizer

    from posttrain.config import TuningConfig
    from posttrain.data.collate import collate
    from posttrain.data.templates import ChatEncoder
    from posttrain.trainers.reference import Reference, forward_inputs, scorer
    from posttrain.tuning import apply_tuning

    tok = AutoTokenizer.from_pretrained(sft_model)
    enc = ChatEncoder(tok)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("What is 12 + 30?", "42"), ("Reverse the word \"taba\".", "abat"), ("hi", "hello there")]]
    batch = collate([[(e.input_ids, e.labels)] for e in map(enc.encode_messages, convs)], tok.pad_token_id)
    base = load_model(ModelConfig(name_or_path=str(sft_model))).eval()
    expected = scorer(base)(forward_inputs(batch), batch["labels"])

    policy = apply_tuning(load_model(ModelConfig(name_or_path=str(sft_model))), TuningConfig(**_tuning_for(name)))
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: most start as the identity, which would make this vacuous
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    policy.train()
    got = Reference("adapters_off").logps(policy, forward_inputs(batch), batch["labels"])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert policy.training
    with torch.no_grad():
        adapted = scorer(policy)(forward_inputs(batch), batch["labels"])
    assert (adapted - expected).abs().max() > 0.05


@pytest.mark.parametrize("name", list(MODES))
def test_dpo_with_each_adapter_mode(tmp_path, sft_model, preference_data, name):
    out = tmp_path / name
    lr = MODES[name][1]
    run(preference_config(sft_model, preference_data, out, "dpo", tuning=_tuning_for(name),
                          training={"max_steps": 3, "learning_rate": lr, "logging_steps": 1, "eval_steps": 3}))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["reference"] == "adapters_off"
    steps = losses(out)
    assert len(steps) == 3 and all(math.isfinite(x) for x in steps)
    starts_as_base = name not in ("prompt", "ptuning", "prefix", "ptuning_v2")
    # The reference is the base: a policy that starts as the base starts at loss ln 2, a prompt does not.
    assert (abs(steps[0] - math.log(2)) < 1e-5) == starts_as_base, steps
    assert abs([m for m in metrics(out) if "eval_rewards/margin" in m][-1]["eval_rewards/margin"]) > 1e-5


@pytest.fixture(scope="module")
def prompt_rows(tmp_path_factory):
    from posttrain.data.synthetic import make_prompt_rows, write_jsonl

    folder = tmp_path_factory.mktemp("tuning_prompts")
    return {"train": write_jsonl(make_prompt_rows(32, seed=5), folder / "prompts.jsonl"),
            "eval": write_jsonl(make_prompt_rows(8, seed=6), folder / "prompts_eval.jsonl")}


@pytest.mark.parametrize("name", ["prompt", "bottleneck"])
def test_grpo_with_a_prompt_and_with_bottleneck_adapters(tmp_path, sft_model, prompt_rows, captured, name):
    out = tmp_path / name
    raw = base_config(
        sft_model, prompt_rows["train"], out, method="grpo", tuning=_tuning_for(name),
        data={"train": [{"path": str(prompt_rows["train"]), "format": "prompt"}],
              "eval": [{"path": str(prompt_rows["eval"]), "format": "prompt"}]},
        # A learnable reward: shorter answers score higher, so every step has advantages to follow.
        online={"rewards": [{"type": "length_penalty", "max_chars": 1, "per_unit": 1.0}],
                "generation": {"max_new_tokens": 8}, "grpo": {"group_size": 4, "kl_coef": 0.05}},
        training={"max_steps": 2, "batch_size": 4, "learning_rate": MODES[name][1], "logging_steps": 1,
                  "eval_steps": 2},
    )
    run(raw)
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 2
    # The engine samples from what the trainer scores: virtual tokens and adapters included.
    assert all(m["logprob_mismatch"] < 1e-5 for m in steps), steps
    assert json.loads((out / "run.json").read_text())["reference"] == "adapters_off"
    # At step 1 bottleneck adapters are the identity (no KL to the base); a prompt is not.
    assert (steps[0]["kl"] > 1e-6) == (name == "prompt")
    after = captured["model"].state_dict()
    own = MODES[name][2]
    assert {k for k in after if not torch.equal(after[k], captured["before"][k])} == {k for k in after if own(k)}


@pytest.mark.parametrize("name", ["prompt", "bottleneck"])
def test_dpo_after_an_adapter_sft_continues_the_adapter_against_the_sft_model(
        tmp_path, tiny_model, task_data, preference_data, captured, name):
    sft = run(base_config(tiny_model, task_data["train"], tmp_path / "sft", tuning=_tuning_for(name),
                          training={"max_steps": 4, "learning_rate": MODES[name][1]}))
    out = tmp_path / "dpo"
    final = run(preference_config(sft, preference_data, out, "dpo", tuning=_tuning_for(name),
                                  training={"max_steps": 2, "learning_rate": MODES[name][1], "logging_steps": 1,
                                            "eval_steps": None}))
    after, own = captured["model"].state_dict(), MODES[name][2]
    assert {k for k in after if not torch.equal(after[k], captured["before"][k])} == {k for k in after if own(k)}
    info = json.loads((out / "run.json").read_text())
    # The SFT adapter stays an adapter, so the reference is the SFT model scored once, not the base.
    assert info["reference"] == "precomputed" and info["status"] == "completed"
    assert losses(out)[0] == pytest.approx(math.log(2), abs=1e-5)  # policy = SFT model = reference at the start
    batch = _batch()
    sft_logits = _logits(load_model(ModelConfig(name_or_path=str(sft))).eval(), batch)
    dpo_model = load_model(ModelConfig(name_or_path=str(final))).eval()
    assert (_logits(dpo_model, batch) - sft_logits).abs().max() > 1e-4  # DPO trained the adapter further
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), batch)
    assert (sft_logits - base_logits).abs().max() > 1e-3

    with pytest.raises(ConfigError, match="can only continue training it"):
        run(preference_config(sft, preference_data, tmp_path / "lora", "dpo", tuning={"mode": "lora"}))
    with pytest.raises(ConfigError, match="bare base"):
        load_config(None, raw=preference_config(sft, preference_data, tmp_path / "off", "dpo", tuning=_tuning_for(name),
                                                preference={"reference": "adapters_off"}))


class _Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["prompt", "ptuning", "prefix", "ptuning_v2", "bottleneck"])
def test_resume_restores_prompts_and_bottleneck_adapters(
        tmp_path, tiny_model, task_data, monkeypatch, name):
    from posttrain.trainers import loop

    def config(folder):
        return base_config(tiny_model, task_data["train"], tmp_path / folder, tuning=_tuning_for(name),
                           training={"max_steps": 6, "save_steps": 3, "learning_rate": MODES[name][1]})

    run(config("whole"))
    real_step = loop.Trainer._train_step

    def crash_at_5(self, batch):
        if self.state.step == 4:
            raise _Crash()
        return real_step(self, batch)

    monkeypatch.setattr(loop.Trainer, "_train_step", crash_at_5)
    with pytest.raises(_Crash):
        run(config("split"))
    monkeypatch.setattr(loop.Trainer, "_train_step", real_step)
    run(config("split"), resume=True)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)


def test_qlora_without_a_gpu_is_refused_before_any_work(tmp_path, tiny_model, task_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "q"
    with pytest.raises(PosttrainError, match=r"tuning.mode=qlora needs a CUDA GPU and bitsandbytes.*tuning.mode=lora"):
        run(base_config(tiny_model, task_data["train"], out, tuning={"mode": "qlora"}))
    assert not out.exists()
    with pytest.raises(PosttrainError, match="needs a CUDA GPU"):
        load_model(ModelConfig(name_or_path=str(tiny_model)), "qlora")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_adapters_over_a_quantised_base_on_gpu(tmp_path, tiny_model, task_data, captured, bits):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / f"q{bits}"
    final = run(base_config(tiny_model, task_data["train"], out,
                            tuning={"mode": "qlora", "qlora": {"bits": bits}, "lora": {"r": 4, "dropout": 0.0}},
                            data={"eval": str(task_data["eval"])},
                            training={"max_steps": 12, "learning_rate": 1e-2, "eval_steps": 12}))
    model = captured["model"]
    assert getattr(model, f"is_loaded_in_{bits}bit")
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], captured["before"][k])}
    assert changed and all(".lora_" in k for k in changed)
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert evals[1] < evals[0]
    # The adapter loads onto the same quantised base again and scores as it did in training.
    from posttrain.config import QloraConfig

    base = load_model(ModelConfig(name_or_path=str(tiny_model)), "qlora", qlora=QloraConfig(bits=bits))
    reloaded = PeftModel.from_pretrained(base, final).eval()
    batch = {k: v.cuda() for k, v in _batch().items()}
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model.eval(), batch), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["ia3", "dora", "lora_embeddings"])
def test_reward_model_with_a_mergeable_adapter_mode_is_saved_whole(tmp_path, sft_model, preference_data, captured,
                                                                   name):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / name
    final = run(preference_config(sft_model, preference_data, out, "reward", tuning=_tuning_for(name),
                                  training={"max_steps": 3, "learning_rate": MODES[name][1], "eval_steps": None}))
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
    batch = _batch()
    # The saved model scores as the trained one did (adapter merged, head included) ...
    torch.testing.assert_close(_logits(reloaded, batch), _logits(captured["model"].eval(), batch),
                               atol=1e-5, rtol=1e-5)
    # ... and the adapter's training is in its backbone.
    start = AutoModelForCausalLM.from_pretrained(sft_model).model.state_dict()
    trained = reloaded.model.state_dict()
    assert any(not torch.allclose(trained[k], start[k]) for k in start)


def test_an_adapter_trained_on_a_merged_adapter_reloads_onto_that_model(tmp_path, tiny_model, task_data,
                                                                        preference_data, captured):
    """LoRA SFT, then LoRA DPO from its output: DPO's adapter names the SFT adapter as its base, not the bare base."""
    lora = {"mode": "lora", "lora": {"r": 4, "dropout": 0.0}}
    sft = run(base_config(tiny_model, task_data["train"], tmp_path / "sft", tuning=lora,
                          training={"max_steps": 4, "learning_rate": 1e-2}))
    dpo = run(preference_config(sft, preference_data, tmp_path / "dpo", "dpo", tuning=lora,
                                training={"max_steps": 2, "learning_rate": 1e-2, "eval_steps": None}))
    assert json.loads((dpo / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft)
    batch = _batch()
    trained = _logits(captured["model"].eval(), batch)
    torch.testing.assert_close(_logits(load_model(ModelConfig(name_or_path=str(dpo))).eval(), batch), trained,
                               atol=2e-5, rtol=1e-5)
    bare = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), dpo).eval()
    assert (_logits(bare, batch) - trained).abs().max() > 1e-3  # the SFT adapter matters
