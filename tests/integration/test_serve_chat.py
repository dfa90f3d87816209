"""`posttrain chat` with scripted input, and the `serve` / `chat` command lines."""

import io
import json

import pytest

from posttrain.cli import main
from posttrain.serve.chat import chat_loop
from posttrain.serve.engine import Sampling, Sequence, load_backend


@pytest.fixture(scope="module")
def backend(tiny_model):
    return load_backend(str(tiny_model), backend="transformers", device="cpu")


def test_chat_keeps_history_and_obeys_commands(backend, monkeypatch):
    seen = []
    render = backend.chat_prompt
    monkeypatch.setattr(backend, "chat_prompt", lambda messages: seen.append(messages) or render(messages))
    script = "hello\n/system Be brief.\nhi\nmore\n/reset\nagain\n/bogus\n\n/exit\nnever read\n"
    out = io.StringIO()
    replies = chat_loop(backend, temperature=0, max_tokens=4, stdin=io.StringIO(script), stdout=out)
    assert replies == 4
    text = out.getvalue()
    assert text.startswith("chatting with tiny") and "never read" not in text
    assert "[system prompt: Be brief.; conversation reset]" in text and "[conversation reset]" in text
    assert "[unknown command /bogus" in text
    system = {"role": "system", "content": "Be brief."}
    assert seen[0] == [{"role": "user", "content": "hello"}]
    assert seen[1] == [system, {"role": "user", "content": "hi"}]
    assert seen[2][:2] == seen[1] and seen[2][2]["role"] == "assistant" and seen[2][3]["content"] == "more"
    assert seen[3] == [system, {"role": "user", "content": "again"}]  # /reset keeps the system prompt
    # The reply streamed to the terminal is the model's greedy answer, as the API gives it.
    first = text.split("assistant> ", 1)[1].split("\nyou> ", 1)[0]
    seq = Sequence(backend.chat_prompt([{"role": "user", "content": "hello"}]), Sampling(4, temperature=0))
    backend.generate([seq])
    assert first == seq.text + (" [cut at --max-tokens]" if seq.finish_reason == "length" else "")


def test_chat_ends_at_end_of_input(backend):
    out = io.StringIO()
    assert chat_loop(backend, temperature=0, max_tokens=2, stdin=io.StringIO("hi\n"), stdout=out) == 1
    assert out.getvalue().endswith("you> \n")


def test_chat_command_line(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/system Be kind.\nhi\n/exit\n"))
    assert main(["chat", str(tiny_model), "--temperature", "0", "--max-tokens", "3"]) == 0
    assert "[system prompt: Be kind.; conversation reset]" in capsys.readouterr().out
    assert main(["chat", str(tiny_model), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_serve_command_line_prints_how_to_reach_it(tiny_model, tmp_path, monkeypatch, capsys):
    started = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.update(app=app, **kw))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    assert main(["serve", str(tiny_model), "--port", "8123", "--api-key", "k", "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8123/v1" in out and "models: tiny" in out
    assert "curl http://127.0.0.1:8123/v1/chat/completions" in out and "Authorization: Bearer $API_KEY" in out
    assert "Bearer k" not in out  # the key itself is not printed
    assert started["port"] == 8123 and started["app"].state.scheduler.max_batch == 2
    assert main(["serve", str(tiny_model), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", str(tiny_model), "--adapter", f"x={tmp_path / 'missing'}"]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
