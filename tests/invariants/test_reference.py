"""The three ways of getting reference log-probs agree, and preference losses are accumulation-invariant."""

import pytest
import torch

from tests.conftest import losses, metrics, preference_config, run


def _run(tmp_path, name, sft_model, preference_data, method, **sections):
    sections.setdefault("training", {})
    sections["training"] = {"max_steps": 4, "eval_steps": 4, "logging_steps": 1, **sections["training"]}
    run(preference_config(sft_model, preference_data, tmp_path / name, method, **sections))
    return tmp_path / name


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_equals_live_copy(tmp_path, sft_model, preference_data, method):
    pre = _run(tmp_path, "pre", sft_model, preference_data, method, preference={"reference": "precomputed"})
    live = _run(tmp_path, "live", sft_model, preference_data, method, preference={"reference": "live"})
    a, b = losses(pre), losses(live)
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-5)
    # The reference matters: rewards are measured against it, and they move away from 0.
    ea, eb = metrics(pre)[-1], metrics(live)[-1]
    assert ea["eval_rewards/margin"] == pytest.approx(eb["eval_rewards/margin"], rel=1e-4, abs=1e-6)
    assert abs(ea["eval_rewards/margin"]) > 1e-3


def test_adapters_off_reference_equals_the_base_model(sft_model):
    from transformers import AutoTokenizer

    from posttrain.config import LoraConfig, ModelConfig, TuningConfig
    from posttrain.data.collate import collate
    from posttrain.data.templates import ChatEncoder
    from posttrain.models.load import load_model
    from posttrain.trainers.reference import Reference, forward_inputs, scorer
    from posttrain.tuning import apply_tuning

    tok = AutoTokenizer.from_pretrained(sft_model)
    enc = ChatEncoder(tok)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("What is 12 + 30?", "42"), ("Reverse the word \"taba\".", "abat"), ("hi", "hello there")]]
    batch = collate([[(e.input_ids, e.labels)] for e in map(enc.encode_messages, convs)], tok.pad_token_id)

    base = load_model(ModelConfig(name_or_path=str(sft_model))).eval()
    expected = scorer(base)(forward_inputs(batch), batch["labels"])

    policy = apply_tuning(load_model(ModelConfig(name_or_path=str(sft_model))),
                          TuningConfig(mode="lora", lora=LoraConfig(r=4, dropout=0.0)))
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: LoRA's B starts at zero, which would make this vacuous
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.train()
    got = Reference("adapters_off").logps(policy, forward_inputs(batch), batch["labels"])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert policy.training  # the reference pass leaves the policy's mode alone
    with torch.no_grad():
        adapted = scorer(policy)(forward_inputs(batch), batch["labels"])
    assert (adapted - expected).abs().max() > 0.1


@pytest.mark.parametrize("method", ["dpo", "kto", "reward"])
def test_accumulated_preference_batches_equal_one_batch(tmp_path, sft_model, preference_data, method):
    one = _run(tmp_path, "one", sft_model, preference_data, method,
               training={"batch_size": 8, "gradient_accumulation_steps": 1, "eval_steps": None})
    four = _run(tmp_path, "four", sft_model, preference_data, method,
                training={"batch_size": 2, "gradient_accumulation_steps": 4, "eval_steps": None})
    a, b = losses(one), losses(four)
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-5)
    ma, mb = metrics(one)[-1], metrics(four)[-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), key
