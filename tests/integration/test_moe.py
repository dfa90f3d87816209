"""Mixture-of-experts fine-tuning on the tiny Qwen3-MoE: router losses, expert loads, frozen routers / experts, LoRA."""

import contextlib

import pytest
import torch

from posttrain.errors import ConfigError
from tests.conftest import base_config, losses, metrics, preference_config, run

ROUTER = ".mlp.gate.weight"
EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


def _weights(folder) -> dict[str, torch.Tensor]:
    """The parameters as transformers holds them (experts fused into 3D tensors; the files keep one per expert)."""
    from transformers import AutoModelForCausalLM

    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}


def _sft(tiny_moe, task_data, out, steps=4, **sections):
    sections.setdefault("training", {})
    sections["training"] = {"max_steps": steps, "learning_rate": 3e-3, "logging_steps": 2, **sections["training"]}
    return base_config(tiny_moe, task_data["train"], out, **sections)


@pytest.fixture(scope="module")
def tokenizer(tiny_moe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_moe)


def test_router_logits_are_the_models_and_transformers_adds_no_loss_without_labels(tiny_moe, tokenizer):
    from transformers import AutoModelForCausalLM

    from posttrain.models.moe import RouterRecorder

    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    first = tokenizer.encode("What is 2 + 3?")
    ids = torch.tensor([first, first[:2] + [tokenizer.pad_token_id] * (len(first) - 2)])
    attention = (ids != tokenizer.pad_token_id).long()
    recorder = RouterRecorder(model, tokenizer.pad_token_id)
    with recorder.recording() as forwards:
        out = model(input_ids=ids, attention_mask=attention, use_cache=False, output_router_logits=True)
    assert len(forwards) == 1 and len(forwards[0].logits) == 2
    for ours, theirs in zip(forwards[0].logits, out.router_logits):
        assert torch.equal(ours, theirs)
    assert torch.equal(forwards[0].mask, attention.reshape(-1).float())
    # transformers adds its own aux loss to `loss` only when labels are passed (our methods pass none) ...
    with torch.no_grad():
        with_labels = model(input_ids=ids, attention_mask=attention, labels=ids, output_router_logits=True)
        plain = model(input_ids=ids, attention_mask=attention, labels=ids)
    added = model.config.router_aux_loss_coef * float(with_labels.aux_loss)
    assert added > 1e-3 and float(with_labels.loss - plain.loss) == pytest.approx(added, abs=1e-5)
    # ... and without labels there is no loss at all, so ours is never counted twice
    assert model(input_ids=ids, attention_mask=attention, output_router_logits=True).loss is None
    # outside recording() nothing is kept; inside, a no-grad forward (a reference with adapters off) neither
    model(input_ids=ids, use_cache=False)
    with recorder.recording() as again, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(forwards) == 1 and again == []


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe"])
def test_other_supported_architectures_are_recorded(arch):
    """Every supported architecture's routers are found and give transformers' own router logits."""
    from posttrain.models.moe import RouterRecorder, moe_spec

    model = _tiny_arch(arch)
    assert moe_spec(model.config).num_experts == 3 and moe_spec(model.config).top_k == 2
    recorder = RouterRecorder(model, 0)
    with recorder.recording() as forwards:
        out = model(input_ids=torch.randint(1, 64, (2, 5)), output_router_logits=True, use_cache=False)
    assert recorder.n_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(forwards[0].logits, out.router_logits))


def _tiny_arch(arch: str, **extra):
    """A 2-layer model of a supported MoE architecture with 3 experts, top-2, from its config alone."""
    import transformers

    sizes = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts_per_tok": 2, "eos_token_id": 0,
             "pad_token_id": 0, **extra}
    sizes["num_local_experts" if arch == "mixtral" else "num_experts"] = 3
    if arch == "qwen2_moe":
        sizes.update(moe_intermediate_size=16, shared_expert_intermediate_size=16)
    config = transformers.AutoConfig.for_model(arch, **sizes)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_freeze_router_also_freezes_qwen2_moes_shared_expert_gate():
    from posttrain.tuning.moe import freeze_router

    model = _tiny_arch("qwen2_moe")
    assert freeze_router(model) == 4  # per layer: the router and the shared expert's gate
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{i}.mlp.{g}.weight" for i in range(2) for g in ("gate", "shared_expert_gate")}


@pytest.mark.parametrize("tuning", ["none", "prompt", "prefix"])
def test_token_count_from_the_masks_is_what_the_routers_see(tiny_moe, tokenizer, tuning):
    """``routed_tokens`` (masks only, before the forward) = the real tokens of the recorded forward."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models.moe import (
        RouterRecorder,
        prepended_virtual_tokens,
        routed_tokens,
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    if tuning != "none":
        kind = PromptTuningConfig if tuning == "prompt" else PrefixTuningConfig
        model = get_peft_model(model, kind(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, pad, pad, pad]])
    padded = {"input_ids": ids, "attention_mask": (ids != pad).long()}
    packed = {"input_ids": torch.tensor([[5, 6, 7, 8, pad, pad]]), "position_ids": torch.tensor([[0, 1, 2, 0, 0, 1]])}
    recorder = RouterRecorder(model, pad)
    virtual = prepended_virtual_tokens(model)
    assert virtual == {"none": 0, "prompt": 3, "prefix": 0}[tuning]
    for inputs in (padded, packed) if tuning == "none" else (padded,):  # prompt learning refuses packing
        with recorder.recording() as forwards:
            model(**inputs, use_cache=False)
        assert routed_tokens(inputs, pad, virtual) == float(forwards[0].stacked()[1].sum())
    assert routed_tokens(padded, pad, virtual) == 9 + 2 * virtual


def test_gradient_checkpointing_gives_the_same_router_losses_and_gradients(tiny_moe):
    """Checkpointed layers run their forward again during backward: the recorder must not count it."""
    from transformers import AutoModelForCausalLM

    from posttrain.config import MoeConfig
    from posttrain.models.moe import RouterRecorder, moe_spec
    from posttrain.trainers.moe import MoeMethod
    from posttrain.trainers.supervised import SupervisedMethod

    def step(checkpointing: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_moe)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pad = model.config.pad_token_id
        method = MoeMethod(SupervisedMethod(pad), RouterRecorder(model, pad), moe_spec(model.config),
                           MoeConfig(aux_loss_coef=0.5, z_loss_coef=0.05), 0.5)
        ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(0)).tolist()
        batch = method.collate([[(ids[0], ids[0])], [(ids[1][:7], ids[1][:7])]])
        method.prepare_step(model, [batch], lambda values: values)
        calls = []
        model.model.layers[0].mlp.gate.register_forward_hook(lambda *args: calls.append(1))
        loss, logged = method.loss(model, batch)
        loss.backward()
        return float(loss.detach()), logged, {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, checkpointed = step(False), step(True)
    assert (plain[3], checkpointed[3]) == (1, 2)  # the router ran again in the backward
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-6)
    for key in ("moe/aux_loss", "moe/z_loss"):
        assert checkpointed[1][key] == pytest.approx(plain[1][key], rel=1e-6)
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_packed_rows_mask_their_trailing_padding():
    from posttrain.models.moe import token_mask

    pad = 3
    ids = torch.tensor([[5, 6, 7, 8, 9, pad, pad], [5, 6, 7, 8, 9, 4, 2]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]])
    mask = token_mask({"input_ids": ids, "position_ids": positions}, pad)
    assert mask.tolist() == [1, 1, 1, 1, 1, 0, 0] + [1] * 7
    assert token_mask({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, pad).sum() == 14


def test_sft_learns_and_the_aux_loss_keeps_routing_balanced(tmp_path, tiny_moe, task_data):
    """Loss falls with the router losses on; without the load-balancing term the routing collapses."""
    training = {"logging_steps": 4}
    on = {"aux_loss_coef": 1.0, "z_loss_coef": 0.001, "log_layer_loads": True}
    balanced = run(_sft(tiny_moe, task_data, tmp_path / "on", steps=12, training=training, moe=on))
    free = run(_sft(tiny_moe, task_data, tmp_path / "off", steps=12, training=training, moe={"aux_loss_coef": 0.0}))
    logged = [m for m in metrics(balanced.parent) if "loss" in m]
    assert len(logged) == 3
    # `loss` is what was optimised: the NLL plus the weighted router terms
    nll = [m["loss"] - 1.0 * m["moe/aux_loss"] - 0.001 * m["moe/z_loss"] for m in logged]
    assert nll[-1] < nll[0] - 0.3
    for m in logged:
        # a top-2 load-balancing loss lies in [k, E] = [2, 4]; z-loss of near-zero router logits is ~ (log 4)^2
        assert 2.0 <= m["moe/aux_loss"] <= 4.0
        assert 0.5 < m["moe/z_loss"] < 5.0
        assert sum(m[f"moe/load/e{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-6)
        for layer in range(2):
            assert sum(m[f"moe/load/l{layer}/e{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-6)
        assert m["moe/load_min"] <= 1.0 <= m["moe/load_max"]
    unbalanced = [m for m in metrics(free.parent) if "loss" in m][-1]
    assert "moe/load/l0/e0" not in unbalanced  # per-layer loads only when asked for
    # Without the term some expert of some layer ends up with (almost) no tokens; with it every one keeps some.
    assert unbalanced["moe/aux_loss"] > logged[-1]["moe/aux_loss"] + 0.2
    assert unbalanced["moe/load_min"] < 0.1 < 0.3 < logged[-1]["moe/load_min"]


def test_freeze_router_and_train_experts(tmp_path, tiny_moe, task_data):
    start = _weights(tiny_moe)
    final = run(_sft(tiny_moe, task_data, tmp_path / "run", moe={"freeze_router": True, "train_experts": [1]}))
    end = _weights(final)
    routers = [n for n in start if n.endswith(ROUTER)]
    experts = [n for n in start if n.endswith(EXPERTS)]
    assert len(routers) == 2 and len(experts) == 4
    for name in routers:
        assert torch.equal(start[name], end[name]), name
    for name in experts:
        assert not torch.equal(start[name][1], end[name][1]), name
        for e in (0, 2, 3):
            assert torch.equal(start[name][e], end[name][e]), (name, e)
    attention = [n for n in start if ".self_attn." in n and n.endswith("proj.weight")]
    assert len(attention) == 8 and all(not torch.equal(start[n], end[n]) for n in attention)  # mode full


def test_lora_on_the_moe_trains_and_reloads(tmp_path, tiny_moe, task_data, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.config import ModelConfig
    from posttrain.models.checkpoint import save_model
    from posttrain.models.load import load_model

    lora = {"mode": "lora", "lora": {"dropout": 0.0, "r": 4, "target_modules": "all-linear"}}
    final = run(_sft(tiny_moe, task_data, tmp_path / "run", steps=12, tuning=lora, moe={"freeze_router": True}))
    curve = losses(final.parent)
    assert curve[-1] < curve[0] - 0.2
    assert all("moe/aux_loss" in m for m in metrics(final.parent) if "loss" in m)  # routers seen through peft

    ids = torch.tensor([tokenizer.encode("What is 2 + 3? The answer is 5.")])
    base = AutoModelForCausalLM.from_pretrained(tiny_moe)
    base_logits = base(input_ids=ids).logits
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe), final).eval()
    names = [n for n, _ in trained.named_parameters() if "lora_" in n]
    assert any(".experts." in n for n in names) and any(".gate." in n for n in names)  # peft's all-linear on MoE
    for n, p in trained.named_parameters():
        if ".mlp.gate." in n and "lora_B" in n:
            assert not p.any(), n  # the router's LoRA never left its zero start
    logits = trained(input_ids=ids).logits
    assert (logits - base_logits).abs().max() > 1e-3

    saved = tmp_path / "resaved"
    save_model(trained, tokenizer, saved)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe), saved).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)
    merged = load_model(ModelConfig(name_or_path=str(final)), "full")
    torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    for n, p in merged.named_parameters():
        if n.endswith(ROUTER):
            assert torch.equal(p, dict(base.named_parameters())[n]), n


def test_dpo_on_the_moe_logs_router_terms(tmp_path, tiny_moe):
    from posttrain.data.synthetic import make_preference_rows, write_jsonl

    pdata = {"train": write_jsonl(make_preference_rows(24, seed=1), tmp_path / "pairs.jsonl"),
             "eval": write_jsonl(make_preference_rows(8, seed=2), tmp_path / "pairs_eval.jsonl")}
    raw = preference_config(tiny_moe, pdata, tmp_path / "dpo", "dpo",
                            training={"max_steps": 3, "logging_steps": 1, "eval_steps": 3, "batch_size": 4},
                            moe={"aux_loss_coef": 0.01})
    final = run(raw)
    logged = [m for m in metrics(final.parent) if "loss" in m]
    assert len(logged) == 3 and all(2.0 <= m["moe/aux_loss"] <= 4.0 for m in logged)
    evals = [m for m in metrics(final.parent) if "eval_loss" in m]
    assert evals and not any(k.startswith("eval_moe/") for m in evals for k in m)  # no router term in eval


def test_dpo_with_lora_logs_the_router_loss_of_the_policys_own_forward(tmp_path, tiny_moe, tokenizer):
    """The reference (adapters off, same routers, no grad) must not count: step 2's logged aux loss is the policy's.

    Every step is the whole data set, so step 2's value is recomputed from the adapter saved after step 1.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.config import load_config
    from posttrain.data.dataset import build_datasets
    from posttrain.data.synthetic import make_preference_rows, write_jsonl
    from posttrain.losses.moe import load_balancing_loss
    from posttrain.trainers.preference import PairMethod

    pdata = {"train": write_jsonl(make_preference_rows(12, seed=1), tmp_path / "pairs.jsonl"),
             "eval": write_jsonl(make_preference_rows(4, seed=2), tmp_path / "pairs_eval.jsonl")}
    lora = {"mode": "lora", "lora": {"dropout": 0.0, "r": 4, "target_modules": "all-linear"}}
    raw = preference_config(tiny_moe, pdata, tmp_path / "dpo", "dpo", tuning=lora,
                            preference={"reference": "adapters_off"}, moe={"aux_loss_coef": 0.01},
                            training={"max_steps": 2, "logging_steps": 1, "eval_steps": 100, "save_steps": 1,
                                      "batch_size": 12, "learning_rate": 2e-2})
    cfg = load_config(None, raw=raw)
    pairs = build_datasets(cfg.data, tokenizer, "dpo", cfg.training.seed, log=lambda *a, **k: None)[0]
    assert len(pairs) == 12  # one global batch = every pair, at every step
    final = run(raw)
    logged = [m["moe/aux_loss"] for m in metrics(final.parent) if "loss" in m]
    assert len(logged) == 2

    batch = PairMethod(cfg, tokenizer.pad_token_id).collate([pairs.row(i) for i in range(len(pairs))])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe),
                                       final.parent / "checkpoints" / "step-1" / "model").eval()
    mask = batch["attention_mask"].reshape(-1).float()

    def aux(*, adapters: bool) -> float:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad(), (contextlib.nullcontext() if adapters else policy.disable_adapter()):
            routers = policy(**inputs, use_cache=False, output_router_logits=True).router_logits
        return float(load_balancing_loss(torch.stack(routers), 2, mask))

    own, reference = aux(adapters=True), aux(adapters=False)
    assert abs(own - reference) > 1e-3  # after one step the adapters route differently from the base
    assert logged[1] == pytest.approx(own, rel=1e-5)


def test_moe_options_on_a_dense_model_are_refused(tmp_path, tiny_model, task_data):
    raw = base_config(tiny_model, task_data["train"], tmp_path / "run", moe={"z_loss_coef": 1e-3})
    with pytest.raises(ConfigError, match=r"moe: options are set \(z_loss_coef=0.001\).*dense model \(llama\)"):
        run(raw)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written


def test_lora_dropout_on_moe_parameters_is_refused_clearly(tmp_path, tiny_moe, task_data):
    raw = _sft(tiny_moe, task_data, tmp_path / "run", tuning={"mode": "lora", "lora": {"dropout": 0.05}})
    with pytest.raises(ConfigError, match=r"tuning.lora.dropout=0.05.*set tuning.lora.dropout=0"):
        run(raw)


def test_tiny_model_cli_builds_an_moe(tmp_path, capsys):
    import json

    from posttrain.cli import main

    args = ["--moe", "3", "--top-k", "1", "--layers", "1", "--hidden", "32"]
    assert main(["tiny-model", str(tmp_path / "m"), *args]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts_per_tok"] == 1
    assert config.get("num_experts", config.get("num_local_experts")) == 3
    assert main(["tiny-model", str(tmp_path / "d"), "--top-k", "2"]) == 2
    assert "add --moe N" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_tiny_moe_sizes_are_checked_before_anything_is_built(tmp_path):
    from posttrain.errors import PosttrainError
    from posttrain.models.tiny import build_tiny_moe

    with pytest.raises(PosttrainError, match=r"^build_tiny_moe: expert_intermediate=0 must be at least 1"):
        build_tiny_moe(tmp_path / "m", expert_intermediate=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(PosttrainError, match=r"^build_tiny_moe: .* is not empty"):
        build_tiny_moe(tmp_path / "full")
    assert not (tmp_path / "m").exists()
