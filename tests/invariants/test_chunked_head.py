"""The chunked LM head (labelled positions only, checkpointed chunks) gives the full-logits values and gradients."""

import copy

import pytest
import torch

from posttrain.data.collate import collate
from posttrain.models import logprobs
from posttrain.models.logprobs import label_logps


def _batch(packed: bool):
    g = torch.Generator().manual_seed(0)

    def sample(n, prompt):
        ids = torch.randint(10, 500, (n,), generator=g).tolist()
        return ids, [-100] * prompt + ids[prompt:]

    if packed:
        rows = [[sample(9, 4), sample(6, 2)], [sample(12, 5)], [sample(5, 1), sample(4, 2), sample(3, 1)]]
    else:
        rows = [[sample(9, 4)], [sample(12, 5)], [sample(5, 1)]]
    return collate(rows, pad_id=3)


def _grads(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logps = label_logps(model, inputs, batch["labels"], chunked=chunked, temperature=0.7)
    (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_chunked_equals_full_logits(model, packed, mode, monkeypatch):
    m = copy.deepcopy(model).double()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
    batch = _batch(packed)
    monkeypatch.setattr(logprobs, "head_chunk_rows", lambda vocab: 5)  # several chunks per batch
    assert logprobs.plain_head(m) is not None
    calls = []
    original = logprobs._chunk_logps
    monkeypatch.setattr(logprobs, "_chunk_logps", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    chunked, g_chunked = _grads(m, batch, chunked=True)
    # Each chunk runs twice, the second time recomputed in the backward: its logits were not kept.
    assert len(calls) > 4 and max(calls) <= 5 and sum(calls) == 2 * int((batch["labels"][:, 1:] != -100).sum())
    full, g_full = _grads(m, batch, chunked=False)
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    assert (full[batch["labels"][:, 1:] == -100] == 0).all()
    assert g_chunked.keys() == g_full.keys() and len(g_full) > 0
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-8, atol=1e-10, msg=name)
    # The head is back in place afterwards.
    base = m.get_base_model() if mode == "lora" else m
    assert not isinstance(base.get_output_embeddings(), torch.nn.Identity)


def test_other_heads_take_the_full_path(model):
    m = copy.deepcopy(model)
    m.config.model_type = "gemma2"  # soft-capped logits: the head is not the last step
    assert logprobs.plain_head(m) is None
    from peft import PromptTuningConfig, get_peft_model

    prompt = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert logprobs.plain_head(prompt) is None


def test_a_batch_without_labelled_tokens_backpropagates_zero(model):
    """One accumulation micro-batch (or one process) may hold no trained token: its loss must still backprop."""
    m = copy.deepcopy(model)
    batch = _batch(packed=False)
    labels = torch.full_like(batch["labels"], -100)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logps = label_logps(m, inputs, labels, chunked=True)
    assert logps.shape == labels[:, 1:].shape and (logps == 0).all()
    logps.sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all((g == 0).all() for g in grads)
