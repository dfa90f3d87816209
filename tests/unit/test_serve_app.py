"""The HTTP layer with fake backends: 429 when the queue is full, OpenAI-style 500s, disconnects without streaming."""

import threading
import time

import pytest

from posttrain.serve.app import create_app
from posttrain.serve.engine import Backend, ModelSet
from tests.live_server import httpx, live

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


class SlowBackend(Backend):
    """One "x" per step of `step_s` seconds until max_tokens; counts the steps it ran."""

    def __init__(self, tokenizer, step_s=0.01):
        super().__init__(ModelSet("fake", "fake", default="fake", aliases={"fake": "fake"}), tokenizer,
                         context_length=256, vocab_size=len(tokenizer))
        self.step_s = step_s
        self.steps = 0

    def generate(self, seqs):
        live_seqs = [s for s in seqs if not s.cancelled]
        while live_seqs:
            time.sleep(self.step_s)
            self.steps += 1
            for seq in list(live_seqs):
                if seq.cancelled:
                    live_seqs.remove(seq)
                    continue
                seq.completion_tokens += 1
                done = seq.completion_tokens >= seq.sampling.max_tokens
                seq.emit("x", "length" if done else None)
                if done:
                    live_seqs.remove(seq)


class BrokenBackend(SlowBackend):
    def generate(self, seqs):
        raise RuntimeError("the GPU caught fire")

    def text_prompt(self, prompt):
        raise KeyError("an unexpected bug")


def test_full_queue_answers_429_and_every_queued_request_completes(tokenizer):
    app = create_app(SlowBackend(tokenizer), max_batch=1, max_queue=2)
    with live(app) as url:
        results = {}

        def ask(name, tokens):
            results[name] = httpx.post(url + "/chat/completions", json={**BODY, "max_tokens": tokens}, timeout=60)

        first = threading.Thread(target=ask, args=("running", 30))
        first.start()
        while app.state.scheduler.snapshot()["running"] == 0:
            time.sleep(0.005)
        waiting = [threading.Thread(target=ask, args=(f"waiting{i}", 2)) for i in range(2)]
        for thread in waiting:
            thread.start()
        while app.state.scheduler.snapshot()["queued"] < 2:
            time.sleep(0.005)
        refused = httpx.post(url + "/chat/completions", json=BODY, timeout=60)
        for thread in [first, *waiting]:
            thread.join()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full" and refused.json()["error"]["type"] == "rate_limit_error"
    assert {name: r.status_code for name, r in results.items()} == {"running": 200, "waiting0": 200, "waiting1": 200}
    assert results["running"].json()["choices"][0]["message"]["content"] == "x" * 30


def test_generation_failure_is_an_openai_style_500(tokenizer):
    with live(create_app(BrokenBackend(tokenizer))) as url:
        answer = httpx.post(url + "/chat/completions", json=BODY, timeout=60)
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["type"] == "server_error" and "the GPU caught fire" in error["message"]
        # Streaming: the error arrives as an event, then the stream ends.
        with httpx.stream("POST", url + "/chat/completions", json={**BODY, "stream": True}, timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert "the GPU caught fire" in lines[-2] and lines[-1] == "data: [DONE]"
        # A bug outside generation: still a 500 with OpenAI's body and a message.
        answer = httpx.post(url + "/completions", json={"model": "fake", "prompt": "hi"}, timeout=60)
        assert answer.status_code == 500 and "an unexpected bug" in answer.json()["error"]["message"]
        assert httpx.get(url + "/models", timeout=60).status_code == 200  # the server lives on


def test_a_non_streaming_client_that_leaves_is_cancelled(tokenizer):
    backend = SlowBackend(tokenizer, step_s=0.02)
    app = create_app(backend)
    with live(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/chat/completions", json={**BODY, "max_tokens": 10_000}, timeout=0.3)
        deadline = time.monotonic() + 10
        while app.state.scheduler.snapshot()["cancelled"] == 0:
            assert time.monotonic() < deadline, app.state.scheduler.snapshot()
            time.sleep(0.02)
        # Stopped early: it would have run ~240 steps (max_tokens is clamped to the 256-token context).
        assert app.state.scheduler.snapshot()["completed"] == 0 and backend.steps < 200
