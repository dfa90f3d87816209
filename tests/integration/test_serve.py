"""`posttrain serve` as a client sees it: the official openai client against a live server on localhost.

One server (the tiny model, a LoRA adapter "a", an API key) serves the whole module; it runs
uvicorn in a background thread on a free port (tests/live_server.py).
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from posttrain.serve.app import create_app
from posttrain.serve.engine import load_backend
from tests.live_server import httpx, live

KEY = "test-key"
HI = [{"role": "user", "content": "hi"}]


def make_lora(tiny_model, out):
    """A LoRA adapter over the tiny model whose B matrices are random (non-zero): it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory):
    return make_lora(tiny_model, tmp_path_factory.mktemp("lora") / "a")


@pytest.fixture(scope="module")
def server(tiny_model, lora_dir):
    # CPU and float32 everywhere: greedy outputs are compared with peft's own, computed on CPU.
    backend = load_backend(str(tiny_model), {"a": str(lora_dir)}, device="cpu")
    app = create_app(backend, api_key=KEY, max_batch=8, max_queue=64)
    with live(app) as url:
        yield {"url": url, "app": app, "backend": backend}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def _post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server["url"] + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60, **kw)


def _stats(server):
    return server["app"].state.scheduler.snapshot()


def _stop_safe_piece(text: str) -> str:
    """A short piece from the middle of ``text`` to use as a stop string."""
    for start in range(3, len(text) - 2):
        piece = text[start:start + 2]
        if "\ufffd" not in piece and piece.strip():
            return piece
    raise AssertionError(f"no usable piece in {text!r}")


# ---------------------------------------------------------------------------------------------------------------
# The happy paths


def test_models_lists_base_and_adapters(client, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "a"]
    # The base answers to its folder name and to the path it was served from.
    reply = client.chat.completions.create(model=str(tiny_model), messages=HI, max_tokens=2, temperature=0)
    assert reply.model == "tiny"


def test_chat_streamed_text_equals_the_whole_reply(client, server):
    for sampling in (dict(temperature=0), dict(temperature=1, seed=11)):
        whole = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, **sampling)
        chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, stream=True,
                                                     stream_options={"include_usage": True}, **sampling))
        choice = whole.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [choice.finish_reason]
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    prompt = server["backend"].chat_prompt(HI)
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completions_streamed_and_not(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=1, seed=3)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=1, seed=3, stream=True))
    assert whole.object == "text_completion" and streamed == whole.choices[0].text != ""
    several = client.completions.create(model="tiny", prompt=["Once upon a time", [5, 6, 7]], n=2, max_tokens=3,
                                        temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text  # greedy: both choices of a prompt agree


def test_n_choices(client):
    reply = client.chat.completions.create(model="tiny", messages=HI, n=2, max_tokens=8, temperature=1, seed=5)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    assert reply.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, n=2, max_tokens=8, temperature=1,
                                                 seed=5, stream=True))
    for choice in reply.choices:
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == choice.index)
        assert text == choice.message.content


def test_stop_strings_cut_the_text(client):
    sampling = dict(model="tiny", messages=HI, max_tokens=24, temperature=1, seed=7)
    full = client.chat.completions.create(**sampling).choices[0].message.content
    stop = _stop_safe_piece(full)
    expected = full[:full.index(stop)]
    for stops in (stop, [stop, "never-appears"]):
        choice = client.chat.completions.create(**sampling, stop=stops).choices[0]
        assert (choice.message.content, choice.finish_reason) == (expected, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **sampling, stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_max_tokens_ends_with_length(client):
    for budget in (dict(max_tokens=5), dict(max_completion_tokens=5)):
        reply = client.chat.completions.create(model="tiny", messages=HI, temperature=1, seed=1, **budget)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_prompt_plus_max_tokens_beyond_the_context_is_clamped(client, server):
    backend = server["backend"]
    prompt = [7] * (backend.context_length - 6)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=100, temperature=1, seed=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6


def test_seed_reproduces_samples(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=1,
                                              seed=seed).choices[0].message.content
    assert sample(123) == sample(123)
    assert sample(123) != sample(124)


# ---------------------------------------------------------------------------------------------------------------
# Bad requests: always a 4xx with OpenAI's error body

GOOD = {"model": "tiny", "messages": HI, "max_tokens": 2}
BAD_CHAT = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": "8"}, "max_completion_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"not_a_parameter": 1}, "not_a_parameter"),
]


@pytest.mark.parametrize("change,param", BAD_CHAT, ids=[p + "=" + json.dumps(c)[:40] for c, p in BAD_CHAT])
def test_bad_chat_requests_are_400(server, change, param):
    answer = _post(server, "/chat/completions", {**GOOD, **change})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_missing_messages_and_bodies_that_are_not_objects_are_400(server):
    for body in ({"model": "tiny"}, [1, 2], "null", b"{not json", b""):
        answer = _post(server, "/chat/completions", body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in _post(server, "/chat/completions", b"{not json").json()["error"]["message"]


def test_bad_completion_requests_are_400(server):
    for change, param in [({"prompt": []}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": [[1, "a"]]}, "prompt"),
                          ({"prompt": [10**7]}, "prompt"), ({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"),
                          ({"prompt": ""}, "prompt"), ({"best_of": 3}, "best_of")]:
        answer = _post(server, "/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, **change})
        assert answer.status_code == 400, (change, answer.text)
        assert answer.json()["error"]["param"] == param


def test_text_that_is_not_unicode_is_400(server):
    chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    for path, body in [("/chat/completions", chat), ("/completions", b'{"model": "tiny", "prompt": "\\ud800"}')]:
        answer = _post(server, path, body)
        assert answer.status_code == 400, answer.text
        assert "not valid Unicode" in answer.json()["error"]["message"]


def test_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert err.value.code == "model_not_found" and "tiny" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, temperature=-1)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_prompt_longer_than_the_context_is_400(client, server):
    long = " ".join(["word"] * 3000)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], max_tokens=2)
    n_prompt = len(server["backend"].chat_prompt([{"role": "user", "content": long}]))
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
    assert "1024" in err.value.message and str(n_prompt) in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=long, max_tokens=2)
    assert err.value.code == "context_length_exceeded"


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=server["url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = _post(server, "/chat/completions", GOOD, key=None)
    assert missing.status_code == 401 and "Missing API key" in missing.json()["error"]["message"]
    # Checked before the body is read: a bad body without a key is still a 401.
    assert _post(server, "/chat/completions", b"{not json", key=None).status_code == 401
    assert httpx.get(server["url"].removesuffix("/v1") + "/health").status_code == 200


def test_unknown_path_is_an_openai_style_404(server):
    answer = httpx.get(server["url"] + "/engines", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 404 and "error" in answer.json()


# ---------------------------------------------------------------------------------------------------------------
# Concurrency and disconnects


def test_concurrent_requests_are_all_answered_and_batched_correctly(client, server):
    prompts = [[{"role": "user", "content": "hi " * (i % 5 + 1)}] for i in range(20)]
    models = ["tiny" if i % 2 else "a" for i in range(20)]

    def ask(i):
        return client.chat.completions.create(model=models[i], messages=prompts[i], max_tokens=4, temperature=0)

    before = _stats(server)
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(ask, range(20)))
    after = _stats(server)
    assert after["completed"] - before["completed"] == 20 and after["queued"] == 0
    assert after["batches"] - before["batches"] < 20  # some were batched
    # Batched answers equal the same requests alone (the padding itself is checked by the next test).
    for i in (0, 1, 4, 7):
        assert ask(i).choices[0].message.content == together[i].choices[0].message.content


def test_left_padded_batch_scores_each_prompt_as_alone(tiny_model, lora_dir, monkeypatch):
    """The first step's logits of a batch of prompts of different lengths equal each prompt's alone."""
    from posttrain.serve.engine import Sampling, Sequence

    backend = load_backend(str(tiny_model), {"a": str(lora_dir)}, device="cpu")  # not the live server's: no races
    prompts = [backend.chat_prompt([{"role": "user", "content": "hi " * k}]) for k in (1, 4, 9)]
    assert len({len(p) for p in prompts}) == 3
    seen = []
    real = backend._forward

    def first_step(input_ids, attention_mask, position_ids, cache):
        logits = real(input_ids, attention_mask, position_ids, cache)
        if input_ids.shape[1] > 1:
            seen.append(logits.clone())
        return logits

    monkeypatch.setattr(backend, "_forward", first_step)

    def run(batch):
        backend.generate([Sequence(p, Sampling(max_tokens=1, temperature=0), adapter="a") for p in batch])

    run(prompts)
    for p in prompts:
        run([p])
    together, alone = seen[0], torch.cat(seen[1:])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


def test_a_client_leaving_mid_stream_frees_the_worker(client, server):
    before = _stats(server)
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1000, temperature=1, seed=0,
                                            stream=True)
    chunks = iter(stream)
    next(chunks)
    next(chunks)  # text has started coming
    stream.close()
    deadline = time.monotonic() + 20
    while _stats(server)["cancelled"] == before["cancelled"] or _stats(server)["running"]:
        assert time.monotonic() < deadline, f"the cancelled stream was not stopped: {_stats(server)}"
        time.sleep(0.02)
    after = _stats(server)
    # Counted as cancelled, not completed: the worker stopped it before its 1000 tokens.
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------------------------
# Adapters and run directories


def _greedy_peft(tiny_model, lora_dir, backend, messages, max_new_tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_dir).eval()
    prompt = torch.tensor([backend.chat_prompt(messages)])
    out = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=backend.stop_ids)
    new = [t for t in out[0, prompt.shape[1]:].tolist()]
    new = new[:next((i for i, t in enumerate(new) if t in backend.stop_ids), len(new))]
    return backend.tokenizer.decode(new, skip_special_tokens=True)


def test_adapter_is_chosen_per_request(client, server, tiny_model, lora_dir):
    def greedy(model):
        return client.chat.completions.create(model=model, messages=HI, max_tokens=10, temperature=0)

    base, adapted, base_again = greedy("tiny"), greedy("a"), greedy("tiny")
    assert adapted.model == "a"
    assert adapted.choices[0].message.content != base.choices[0].message.content
    assert base_again.choices[0].message.content == base.choices[0].message.content
    expected = _greedy_peft(tiny_model, lora_dir, server["backend"], HI, 10)
    assert adapted.choices[0].message.content == expected


def test_training_run_dirs_are_served(tmp_path, tiny_model, lora_dir, client):
    from transformers import AutoTokenizer

    # What a LoRA run leaves: run.json and final/ holding the adapter and the tokenizer.
    run = tmp_path / "lora-run"
    shutil.copytree(lora_dir, run / "final")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(run / "final")
    (run / "run.json").write_text("{}")
    backend = load_backend(str(run), device="cpu")
    with live(create_app(backend)) as url:
        run_client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in run_client.models.list().data] == ["lora-run", "tiny"]
        reply = run_client.chat.completions.create(messages=HI, max_tokens=10, temperature=0, model="lora-run")
    expected = client.chat.completions.create(model="a", messages=HI, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected.choices[0].message.content
    # A full-model run: final/ is the model itself, served under the run's name.
    shutil.copytree(tiny_model, tmp_path / "full-run" / "final")
    assert load_backend(str(tmp_path / "full-run"), device="cpu").model_ids == ["full-run"]


def test_an_adapter_trained_on_an_adapter_run_is_served_over_the_merged_chain(tmp_path, tiny_model):
    """LoRA DPO after LoRA SFT names the SFT run's adapter as its base: both adapters must be in the served model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import ModelConfig
    from posttrain.models.load import load_model

    sft = make_lora(tiny_model, tmp_path / "sft" / "final")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sft)
    torch.manual_seed(1)
    second = get_peft_model(load_model(ModelConfig(name_or_path=str(sft))),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    second.save_pretrained(tmp_path / "dpo" / "final")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "dpo" / "final")

    backend = load_backend(str(tmp_path / "dpo"), device="cpu")
    assert backend.model_ids == ["dpo", "sft"]  # the base is named after its run, not "final"
    ids = torch.tensor([backend.chat_prompt(HI)])
    backend.model.set_adapter("dpo")
    with torch.no_grad():
        served = backend.model(ids).logits
        expected = second.eval()(ids).logits
        bare = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)
    assert (served - bare).abs().max() > 1e-2
