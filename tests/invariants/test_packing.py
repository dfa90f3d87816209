"""A sample inside a packed row gets exactly the logits it gets alone."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.collate import collate
from posttrain.data.synthetic import make_task_rows
from posttrain.data.templates import ChatEncoder
from posttrain.losses.nll import nll_sum


def test_packed_logits_equal_alone(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    enc = ChatEncoder(tok)
    samples = [enc.encode_messages(r["messages"]) for r in make_task_rows(5, seed=3)]
    rows = [[(s.input_ids, s.labels) for s in samples[:3]], [(s.input_ids, s.labels) for s in samples[3:]]]
    packed = collate(rows, tok.pad_token_id)
    assert "attention_mask" not in packed
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
        packed_loss, packed_n = nll_sum(logits, packed["labels"])
        alone_loss = alone_n = 0
        for r, row in enumerate(rows):
            at = 0
            for ids, labels in row:
                single = collate([[(ids, labels)]], tok.pad_token_id)
                ref = model(**{k: v for k, v in single.items() if k != "labels"}, use_cache=False).logits
                torch.testing.assert_close(logits[r, at : at + len(ids)], ref[0], rtol=1e-5, atol=1e-5)
                loss, n = nll_sum(ref, single["labels"])
                alone_loss, alone_n = alone_loss + loss, alone_n + n
                at += len(ids)
    assert int(packed_n) == int(alone_n)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)


def test_without_restarting_positions_samples_would_leak(tiny_model):
    """Control: the same packed row with one continuous sequence gives different logits (the mask matters)."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    enc = ChatEncoder(tok)
    a, b = (enc.encode_messages(r["messages"]) for r in make_task_rows(2, seed=4))
    ids = torch.tensor([a.input_ids + b.input_ids])
    with torch.no_grad():
        continuous = model(input_ids=ids, use_cache=False).logits[0, len(a.input_ids) :]
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    assert not torch.allclose(continuous, alone, atol=1e-4)


def test_a_kv_cache_disables_the_packed_mask(tiny_model):
    """Why every training forward passes use_cache=False: with a cache, transformers skips
    the packed-sequence mask and samples silently attend to each other."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    enc = ChatEncoder(tok)
    a, b = (enc.encode_messages(r["messages"]) for r in make_task_rows(2, seed=5))
    batch = collate([[(a.input_ids, a.labels), (b.input_ids, b.labels)]], tok.pad_token_id)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits[0]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    assert not torch.allclose(cached[0, len(a.input_ids) :], alone, atol=1e-4)
