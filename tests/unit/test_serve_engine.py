"""The serving engine's parts: text streaming with stop strings, which models a folder serves, sampling, limits."""

import importlib.util
import json
import sys

import pytest
import torch

from posttrain.errors import MissingExtraError, PosttrainError
from posttrain.serve.engine import Sampling, Sequence, TextStream, _Row, choice_seed, load_backend, resolve_models
from posttrain.serve.schemas import ApiError


def _stream(pieces: list[str], stop=()):
    """A TextStream over fake tokens: token i decodes to pieces[i]."""
    return TextStream(lambda ids: "".join(pieces[i] for i in ids), tuple(stop))


def _run(stream, n):
    out, stopped = [], False
    for token in range(n):
        text, stopped = stream.push(token)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_text_stream_sends_text_as_it_comes():
    out, stopped = _run(_stream(["Hel", "lo", " world"]), 3)
    assert out == ["Hel", "lo", " world"] and not stopped


def test_stop_string_across_tokens_is_cut_and_never_sent():
    stream = _stream(["The", " an", "swer", " is", " 4"], stop=["answer"])
    out, stopped = _run(stream, 5)
    # " an" may begin the stop string: it is held back, then dropped with it.
    assert out == ["The", " ", ""] and stopped
    assert "".join(out) == "The "


def test_held_back_text_is_released_when_the_stop_string_does_not_follow():
    stream = _stream(["a", "##", "b", "#"], stop=["###"])
    out, stopped = _run(stream, 4)
    assert out == ["a", "", "##b", ""] and not stopped
    assert stream.flush() == "#"


def test_earliest_of_several_stop_strings_wins():
    out, stopped = _run(_stream(["x END y STOP"]), 1)
    assert out == ["x END y STOP"] and not stopped
    out, stopped = _run(_stream(["x END y STOP"], stop=["STOP", "END"]), 1)
    assert out == ["x "] and stopped


def test_incomplete_utf8_is_held_back():
    stream = TextStream(lambda ids: "é" if len(ids) == 2 else "\ufffd")
    assert stream.push(0) == ("", False)
    assert stream.push(1) == ("é", False)


def test_choice_seeds_differ_by_choice_and_accept_any_int():
    seeds = {choice_seed(s, i) for s in (0, 1, -5, 2**80) for i in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert choice_seed(7, 1) == choice_seed(7, 1)


def test_sampling_refuses_bad_values():
    for bad in (dict(max_tokens=0), dict(max_tokens=4, temperature=-1), dict(max_tokens=4, top_p=0),
                dict(max_tokens=4, temperature=float("nan"))):
        with pytest.raises(ValueError):
            Sampling(**bad)


class _FakeBackend:
    stop_ids = [0]

    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    row = _Row(Sequence([1], Sampling(10, temperature=1.0, top_p=0.5, seed=0)), _FakeBackend(), torch.device("cpu"))
    # Token 1 holds ~73% of the mass: a nucleus of 0.5 is token 1 alone.
    assert {row.pick(logits) for _ in range(50)} == {1}
    row = _Row(Sequence([1], Sampling(10, temperature=1.0, top_p=1.0, seed=0)), _FakeBackend(), torch.device("cpu"))
    assert {row.pick(logits) for _ in range(200)} >= {1, 2}


def test_row_finishes_on_stop_token_or_length():
    seq = Sequence([1], Sampling(3, temperature=0))
    row = _Row(seq, _FakeBackend(), torch.device("cpu"))
    assert not row.push(1) and not row.push(2) and row.push(0)
    assert (seq.text, seq.finish_reason, seq.completion_tokens) == ("ab", "stop", 3)
    seq = Sequence([1], Sampling(2, temperature=0))
    row = _Row(seq, _FakeBackend(), torch.device("cpu"))
    assert not row.push(3) and row.push(4)
    assert (seq.text, seq.finish_reason) == ("cd", "length")


# ---------------------------------------------------------------------------------------------------------------
# Which models a folder serves


def _fake_adapter(folder, base):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    return folder


def test_model_folder_is_served_under_its_name(tiny_model):
    models = resolve_models(str(tiny_model))
    assert models.ids == ["tiny"] and models.default == "tiny" and models.adapters == {}
    assert models.aliases[str(tiny_model)] == "tiny"


def test_run_dir_serves_its_final_model_under_the_run_name(tmp_path, tiny_model):
    (tmp_path / "sft" / "final").mkdir(parents=True)
    (tmp_path / "sft" / "final" / "config.json").write_text("{}")
    models = resolve_models(str(tmp_path / "sft"))
    assert models.ids == ["sft"] and models.base_path == str(tmp_path / "sft" / "final")
    assert resolve_models(str(tmp_path / "sft" / "final")).ids == ["sft"]


def test_lora_run_dir_is_served_over_its_base_and_adapters_are_added(tmp_path, tiny_model):
    _fake_adapter(tmp_path / "lora-sft" / "final", tiny_model)
    _fake_adapter(tmp_path / "other", tiny_model)
    models = resolve_models(str(tmp_path / "lora-sft"), {"b": str(tmp_path / "other")})
    assert models.ids == ["lora-sft", "tiny", "b"] and models.default == "lora-sft"
    assert models.base_path == str(tiny_model) and models.tokenizer_path == str(tiny_model)
    assert models.adapters == {"lora-sft": str(tmp_path / "lora-sft" / "final"), "b": str(tmp_path / "other")}


def test_bad_model_sets_are_refused_with_a_reason(tmp_path, tiny_model):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(PosttrainError, match="no final/ model yet"):
        resolve_models(str(tmp_path / "run"))
    with pytest.raises(PosttrainError, match="does not exist"):
        resolve_models(str(tmp_path / "missing"))
    with pytest.raises(PosttrainError, match="not a LoRA adapter folder"):
        resolve_models(str(tiny_model), {"a": str(tiny_model)})
    _fake_adapter(tmp_path / "a", tiny_model)
    with pytest.raises(PosttrainError, match="already served"):
        resolve_models(str(tiny_model), {"tiny": str(tmp_path / "a")})
    # Adapters that add virtual tokens or layers of their own: the streaming decoder cannot serve them.
    prompt = _fake_adapter(tmp_path / "prompt" / "final", tiny_model)
    (prompt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model),
                                                            "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(PosttrainError, match="holds a prompt adapter"):
        resolve_models(str(tmp_path / "prompt"))
    with pytest.raises(PosttrainError, match="holds a prompt adapter"):
        resolve_models(str(tiny_model), {"p": str(prompt)})
    (tmp_path / "bottleneck").mkdir()
    (tmp_path / "bottleneck" / "bottleneck_config.json").write_text("{}")
    with pytest.raises(PosttrainError, match="holds a bottleneck adapter"):
        resolve_models(str(tmp_path / "bottleneck"))


def test_backend_limits_and_model_names(tiny_model):
    backend = load_backend(str(tiny_model), backend="transformers", device="cpu")
    assert backend.context_length == 1024
    assert backend.resolve(None) == backend.resolve("tiny") == backend.resolve(str(tiny_model)) == "tiny"
    with pytest.raises(ApiError) as err:
        backend.resolve("gpt-4")
    assert err.value.status == 404 and err.value.code == "model_not_found"
    assert backend.fit(1000, None, param="prompt") == 24 and backend.fit(1000, 8, param="prompt") == 8
    assert backend.fit(10, 5000, param="prompt") == 1014  # clamped to the room left
    with pytest.raises(ApiError) as err:
        backend.fit(1024, 1, param="prompt")
    assert err.value.code == "context_length_exceeded" and "1024" in err.value.message
    with pytest.raises(ApiError):
        backend.text_prompt([5, 10**6])


def test_auto_backend_never_imports_vllm_without_a_gpu(tiny_model, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto may pick vLLM")
    # An installed vLLM that must not be imported: importing it fails the test.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('vllm imported on CPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_backend(str(tiny_model), backend="auto").name == "transformers"
    assert "vllm" not in sys.modules
    with pytest.raises(PosttrainError, match="needs a CUDA GPU"):
        load_backend(str(tiny_model), backend="vllm")


def test_vllm_backend_without_vllm_is_one_clear_error(tiny_model):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(MissingExtraError, match="vllm"):
        load_backend(str(tiny_model), backend="vllm")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoding_on_gpu_matches_cpu_greedy(tiny_model):
    """bfloat16 on the GPU by default; in float32 its greedy tokens are the CPU's."""
    cpu = load_backend(str(tiny_model), backend="transformers", device="cpu")
    gpu = load_backend(str(tiny_model), backend="transformers", device="cuda", dtype="float32")
    assert load_backend(str(tiny_model), backend="transformers").model.dtype in (torch.bfloat16, torch.float32)
    prompt = cpu.chat_prompt([{"role": "user", "content": "hi"}])
    outputs = []
    for backend in (cpu, gpu):
        seqs = [Sequence(prompt, Sampling(8, temperature=0)), Sequence(prompt[:5], Sampling(8, temperature=0))]
        backend.generate(seqs)
        outputs.append([(s.text, s.finish_reason) for s in seqs])
    assert outputs[0] == outputs[1]
    seq = Sequence(prompt, Sampling(8, temperature=1.0, top_p=0.9, seed=0))
    gpu.generate([seq])
    assert seq.completion_tokens >= 1 and seq.finish_reason in ("stop", "length")
