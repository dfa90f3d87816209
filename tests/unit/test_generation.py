import copy
import importlib.util

import pytest
import torch

from posttrain.data.templates import IGNORE_INDEX, ChatEncoder
from posttrain.errors import MissingExtraError, PosttrainError
from posttrain.generation import Generation, SamplingParams, TransformersEngine, make_engine
from posttrain.models.logprobs import per_token_logps

QUESTIONS = ["What is 2 + 3?", "Name a colour of the sky on a clear summer afternoon, please.", "Hi"]




@pytest.fixture(scope="module")
def end_of_turn(tokenizer):
    return ChatEncoder(tokenizer).end_of_turn_id


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def engine(model, tokenizer, end_of_turn):
    return TransformersEngine(model, tokenizer, stop_token_ids=[end_of_turn])


def teacher_forced_logps(model, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token, from one forward pass over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + completion])
    with torch.no_grad():
        logits = model(ids).logits
    return per_token_logps(logits / temperature, labels)[0, len(prompt) - 1 :]


def test_one_list_of_n_generations_per_prompt(engine, prompts):
    out = engine.generate(prompts, SamplingParams(max_new_tokens=5, n=3, seed=0))
    assert len(out) == len(prompts)
    for index, generations in enumerate(out):
        assert len(generations) == 3
        for g in generations:
            assert isinstance(g, Generation)
            assert g.prompt_index == index
            assert 1 <= len(g.completion_ids) <= 5
            assert len(g.logprobs) == len(g.completion_ids)
            assert g.finish_reason in ("stop", "length")
            assert all(lp <= 0 for lp in g.logprobs)
    assert engine.generate([], SamplingParams()) == []


def test_batches_smaller_than_the_work_give_the_same_result(model, tokenizer, end_of_turn, engine, prompts):
    params = SamplingParams(max_new_tokens=6, temperature=0)
    one_at_a_time = TransformersEngine(model, tokenizer, stop_token_ids=[end_of_turn], batch_size=1)
    for a, b in zip(engine.generate(prompts, params), one_at_a_time.generate(prompts, params)):
        assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
        torch.testing.assert_close(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-5, rtol=0)


def test_left_padding_does_not_change_greedy_results(engine, prompts):
    short, long = prompts[2], prompts[1]
    assert len(short) < len(long)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    alone = engine.generate([short], params)[0][0]
    batched = engine.generate([long, short], params)[1][0]
    assert batched.completion_ids == alone.completion_ids
    torch.testing.assert_close(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_greedy_picks_the_argmax_and_reports_temperature_one_logprobs(model, engine, prompts):
    out = engine.generate(prompts[:2], SamplingParams(max_new_tokens=6, temperature=0, n=2))
    for prompt, (first, second) in zip(prompts, out):
        assert first.completion_ids == second.completion_ids
        ids = torch.tensor([prompt + first.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == first.completion_ids
        expected = teacher_forced_logps(model, prompt, first.completion_ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(first.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_logprobs_equal_a_teacher_forced_recomputation(model, engine, prompts, temperature, top_p):
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, n=2, seed=3)
    for prompt, generations in zip(prompts, engine.generate(prompts, params)):
        for g in generations:
            expected = teacher_forced_logps(model, prompt, g.completion_ids, temperature)
            torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


def test_logprobs_are_taken_before_top_p_truncation(engine, prompts):
    # A nucleus this small holds only the most likely token: sampling is greedy, yet the
    # log-probs are those of the whole distribution (not 0, as after renormalising).
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    nucleus = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=0))
    for [g], [s] in zip(greedy, nucleus):
        assert s.completion_ids == g.completion_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(g.logprobs), atol=1e-5, rtol=0)
        assert max(s.logprobs) < -1e-3


def test_stops_at_a_stop_token_and_keeps_it(model, tokenizer, engine, prompts):
    params = SamplingParams(max_new_tokens=12, seed=5)
    reference = engine.generate([prompts[1]], params)[0][0].completion_ids
    assert len(reference) == 12
    stop = reference[4]
    cut = reference[: reference.index(stop) + 1]

    stopping = TransformersEngine(model, tokenizer, stop_token_ids=[stop])
    # The same seed replays the same draws up to the stop token.
    [[g]] = stopping.generate([prompts[1]], params)
    assert g.completion_ids == cut
    assert g.finish_reason == "stop"
    assert g.text == tokenizer.decode(cut[:-1], skip_special_tokens=True)
    assert len(g.logprobs) == len(cut)

    # In a batch, rows that stop early carry nothing after their stop token.
    for generations in stopping.generate(prompts, SamplingParams(max_new_tokens=12, n=4, seed=1)):
        for g in generations:
            assert (g.finish_reason == "stop") == (stop in g.completion_ids)
            if g.finish_reason == "stop":
                assert g.completion_ids.index(stop) == len(g.completion_ids) - 1
            else:
                assert len(g.completion_ids) == 12


def test_length_when_max_new_tokens_runs_out(engine, end_of_turn, tokenizer, prompts):
    for [g] in engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=0)):
        assert end_of_turn not in g.completion_ids
        assert g.finish_reason == "length"
        assert len(g.completion_ids) == 3
        assert g.text == tokenizer.decode(g.completion_ids, skip_special_tokens=True)


def test_a_seed_reproduces_samples_and_leaves_the_global_rng_alone(engine, prompts):
    params = SamplingParams(max_new_tokens=8, n=2, seed=11)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state)
    b = engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=12))
    ids = lambda out: [[g.completion_ids for g in gs] for gs in out]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert a[0][0].completion_ids != a[0][1].completion_ids  # the n samples of a prompt differ
    assert torch.equal(torch.get_rng_state(), state)


def test_eval_mode_during_generation_and_restored_after(model, engine, prompts):
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    model.lm_head.eval()  # a mixed state must come back as it was
    try:
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert model.training and model.model.training and not model.lm_head.training
    model.eval()


def test_the_models_own_sampling_settings_do_not_change_what_is_sampled(model, tokenizer, end_of_turn, engine, prompts):
    opinionated = copy.deepcopy(model)
    opinionated.generation_config.top_k = 1
    opinionated.generation_config.repetition_penalty = 10.0
    opinionated.generation_config.no_repeat_ngram_size = 1
    other = TransformersEngine(opinionated, tokenizer, stop_token_ids=[end_of_turn])
    ids = lambda out: [[g.completion_ids for g in gs] for gs in out]
    for params in (SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, n=2, seed=2)):
        assert ids(other.generate(prompts, params)) == ids(engine.generate(prompts, params))

    opinionated.generation_config.suppress_tokens = [5]
    with pytest.raises(PosttrainError, match="suppress_tokens"):
        other.generate(prompts, params)


def test_works_on_a_peft_model(model, tokenizer, end_of_turn, engine, prompts):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    params = SamplingParams(max_new_tokens=6, temperature=0)
    # LoRA starts as the identity (B = 0), so the adapted model generates what the base does.
    out = TransformersEngine(peft_model, tokenizer, stop_token_ids=[end_of_turn]).generate(prompts, params)
    expected = engine.generate(prompts, params)
    assert [g.completion_ids for [g] in out] == [g.completion_ids for [g] in expected]


@pytest.mark.parametrize("mode", ["prompt", "ptuning", "prefix", "bottleneck"])
def test_prompt_learning_and_bottleneck_models_sample_what_they_score(model, tokenizer, end_of_turn, prompts, mode):
    from posttrain.config import TuningConfig
    from posttrain.tuning import apply_tuning

    tuned = apply_tuning(copy.deepcopy(model), TuningConfig(
        mode=mode, prompt={"num_virtual_tokens": 4, "init": "random"}, ptuning={"num_virtual_tokens": 4},
        prefix={"num_virtual_tokens": 4}))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (bottleneck adapters start as the identity)
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    # Three lengths (left padding for bottleneck; one batch per length for virtual tokens), and two prompts of
    # one length (batched together either way).
    prompts = [*prompts, prompts[0][::-1]]
    assert len({len(p) for p in prompts}) == len(prompts) - 1
    out = TransformersEngine(tuned, tokenizer, stop_token_ids=[end_of_turn]).generate(
        prompts, SamplingParams(max_new_tokens=6, temperature=0.8, seed=0))
    for prompt, [g] in zip(prompts, out):
        expected = teacher_forced_logps(tuned, prompt, g.completion_ids, 0.8)
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-5, rtol=0)
    base = teacher_forced_logps(model, prompts[0], out[0][0].completion_ids, 0.8)
    assert (base - teacher_forced_logps(tuned, prompts[0], out[0][0].completion_ids, 0.8)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "bad",
    [
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=-0.1),
        dict(temperature=-0.5),
        dict(temperature=float("nan")),
        dict(n=0),
        dict(max_new_tokens=0),
    ],
)
def test_sampling_params_are_validated(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.1).greedy


def test_bad_engine_input_is_refused(model, tokenizer, engine):
    with pytest.raises(ValueError, match="stop_token_ids"):
        TransformersEngine(model, tokenizer, stop_token_ids=[])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())


def test_make_engine(model, tokenizer, end_of_turn):
    assert isinstance(make_engine("auto", model, tokenizer, stop_token_ids=[end_of_turn]), TransformersEngine)
    built = make_engine("transformers", model, tokenizer, stop_token_ids=[end_of_turn], batch_size=4)
    assert isinstance(built, TransformersEngine) and built.batch_size == 4
    with pytest.raises(ValueError, match="one of auto, transformers, vllm"):
        make_engine("sglang", model, tokenizer, stop_token_ids=[end_of_turn])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_without_vllm_names_the_extra(model, tokenizer, end_of_turn):
    with pytest.raises(MissingExtraError, match=r"pip install 'posttrain\[vllm\]'"):
        make_engine("vllm", model, tokenizer, stop_token_ids=[end_of_turn], model_path="some/model")


def test_resolve_engine_and_sampling_params_read_a_generation_section(monkeypatch):
    from types import SimpleNamespace

    from posttrain.generation import resolve_engine, sampling_params

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # vLLM "installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine("auto") == "vllm"
    assert resolve_engine("auto", vllm_can_load=False) == "transformers"  # e.g. an adapter being trained
    assert resolve_engine("vllm", vllm_can_load=False) == "vllm"  # asked for explicitly: config checks refuse it
    with pytest.raises(ValueError, match="must be one of"):
        resolve_engine("sglang")
    gen = SimpleNamespace(max_new_tokens=7, temperature=0.6, top_p=0.9)
    assert sampling_params(gen, n=3, seed=5) == SamplingParams(max_new_tokens=7, temperature=0.6, top_p=0.9, n=3,
                                                               seed=5)
    assert sampling_params(gen, greedy=True) == SamplingParams(max_new_tokens=7, temperature=0.0, top_p=1.0)
