"""Model FLOPs per batch (PaLM's count, frozen weights at 4N, attention per sample) and the MFU the loop logs."""

import pytest
import torch

from posttrain.data.collate import collate
from posttrain.trainers import loop
from posttrain.trainers.flops import FlopCounter, peak_bf16_flops, sample_lengths
from tests.conftest import base_config, metrics, run


def _tiny_sizes(model):
    """Hand count for the tiny Llama (2 layers, hidden 64, 4 heads of 16, 2 KV heads, MLP 256, tied head)."""
    vocab = model.config.vocab_size
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 256 + 2 * 64  # q, k+v, o, gate/up/down, two norms
    return 2 * per_layer + 64 + vocab * 64  # layers, final norm, the (tied) head


def test_full_model_costs_6n_per_token_and_12lhn2_per_sample(model):
    counter = FlopCounter(model)
    assert counter.per_token == 6 * _tiny_sizes(model)
    assert counter.per_square == 12 * 2 * 4 * 16
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])}
    assert counter.batch_flops(batch, pad_id=0) == counter.per_token * 7 + counter.per_square * (25 + 4)


def test_the_chunked_head_is_charged_per_labelled_token(model):
    counter = FlopCounter(model, chunked_head=True)
    head = 6 * model.config.vocab_size * 64
    assert counter.per_labelled == head and counter.per_token == 6 * _tiny_sizes(model) - head
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": labels,
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])}
    assert counter.batch_flops(batch, pad_id=0) == counter.per_token * 7 + head * 3 + counter.per_square * (25 + 4)


def test_experts_count_at_top_k_over_e(tiny_moe):
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(tiny_moe)
    cfg = moe.config
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    rest = sum(p.numel() for n, p in moe.named_parameters() if ".experts." not in n and "embed_tokens" not in n)
    tied = cfg.tie_word_embeddings
    head = 0 if not tied else cfg.vocab_size * cfg.hidden_size  # a tied head shares the skipped embedding
    assert experts > 0 and cfg.num_experts_per_tok < cfg.num_experts
    expected = 6 * (rest + head + experts * cfg.num_experts_per_tok / cfg.num_experts)
    assert FlopCounter(moe).per_token == pytest.approx(expected)


def test_frozen_weights_cost_4n(model):
    from peft import LoraConfig, get_peft_model

    import copy

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapter == 2 * (64 * 2 + 2 * 64)  # A and B of q_proj in two layers
    assert FlopCounter(lora).per_token == 4 * _tiny_sizes(model) + 6 * adapter


def test_sample_lengths_of_packed_and_padded_rows():
    pad = 3
    padded = collate([[([5, 6, 7], [-100, 6, 7])], [([5, 6], [-100, 6])]], pad)
    assert sample_lengths(padded, pad).tolist() == [3, 2]
    packed = collate([[([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], [([5, 6, 7, 8], [-100, 6, 7, 8])]], pad)
    assert "attention_mask" not in packed
    # Row 0: samples of 3 and 2 tokens; row 1: one of 4 plus one pad at the end, which is no sample.
    assert packed["input_ids"].shape == (2, 5)
    assert sorted(sample_lengths(packed, pad).tolist()) == [2, 3, 4]


def test_no_peak_on_cpu():
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_loop_logs_mfu_where_the_peak_is_known(tmp_path, tiny_model, task_data, monkeypatch):
    training = {"max_steps": 4, "logging_steps": 2, "batch_size": 4}
    plain = run(base_config(tiny_model, task_data["train"], tmp_path / "cpu", training=training)).parent
    assert all("mfu" not in m for m in metrics(plain))

    monkeypatch.setattr(loop, "peak_bf16_flops", lambda device: 1e9)
    logged = run(base_config(tiny_model, task_data["train"], tmp_path / "peak", training=training)).parent
    records = [m for m in metrics(logged) if "loss" in m]
    assert len(records) == 2
    for m in records:
        # FLOPs / time / peak: with a 1 GFLOP/s "peak" the tiny model's real rate gives a positive, finite ratio;
        # the same tokens at the logged speed bound it from below (6N per trained token is less than the count).
        assert 0 < m["mfu"] < float("inf")
        assert m["mfu"] * 1e9 >= 6 * 0.9 * m["tokens_per_sec"] * _tiny_sizes_from_run(logged)


def _tiny_sizes_from_run(run_dir):
    from transformers import AutoModelForCausalLM

    return _tiny_sizes(AutoModelForCausalLM.from_pretrained(run_dir / "final"))
