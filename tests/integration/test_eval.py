"""Evaluation suites before and after a stage, eval.json, `posttrain eval`, forgetting, and the lm-eval bridge."""

import json
import re
import sys
import types

import pytest

from tests.conftest import metrics, run


def _choices(prompts_file, out):
    from posttrain.data.synthetic import write_jsonl

    rows = []
    for line in prompts_file.read_text().splitlines()[:64]:
        r = json.loads(line)
        digits = r["prompt"].removeprefix("What is the largest of ").removesuffix("?").split(", ")
        rows.append({"question": r["prompt"], "choices": digits, "answer": r["answer"]})
    return write_jsonl(rows, out)


@pytest.fixture(scope="module")
def suites(largest_task, domain_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("suites")
    return [
        {"name": "largest", "type": "generation", "path": str(largest_task["eval"]), "max_new_tokens": 4,
         "scorers": [{"type": "exact_match"}, {"type": "regex", "pattern": r"^\d$", "name": "one_digit"}]},
        {"name": "largest_mc", "type": "multiple_choice", "path": str(_choices(largest_task["eval"],
                                                                               folder / "mc.jsonl"))},
        {"name": "general", "type": "perplexity", "path": str(domain_data), "limit": 40},
    ]


def sft_config(task, out, suites, **eval_section):
    return {
        "model": {"name_or_path": str(task["base"])}, "method": "sft", "tuning": {"mode": "full"},
        "data": {"train": str(task["root"] / "sft.jsonl"), "max_seq_len": 64, "packing": True,
                 "cache_dir": str(task["root"] / "cache")},
        "training": {"max_steps": 80, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 20,
                     "logging_steps": 20, "progress_bar": False, "seed": 0},
        "eval": {"suites": suites, "forgetting": {"suite": "general", "threshold": 0.5}, **eval_section},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def sft_run(largest_task, suites, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "sft"
    run(sft_config(largest_task, out, suites, every_steps=40))
    return out


def test_a_stage_with_an_eval_section_writes_before_and_after(sft_run, largest_task):
    record = json.loads((sft_run / "eval.json").read_text())
    by = {s["name"]: s for s in record["suites"]}
    assert set(by) == {"largest", "largest_mc", "general"}
    gen = by["largest"]
    assert gen["metric"] == "exact_match" and gen["higher_is_better"] and gen["n"] == 256
    # The random base model cannot answer; 80 SFT steps teach it most of the task.
    assert gen["before"]["exact_match"] < 0.1 and gen["after"]["exact_match"] > 0.6
    assert gen["after"]["one_digit"] > 0.9
    assert by["largest_mc"]["after"]["accuracy"] > by["largest_mc"]["before"]["accuracy"]
    assert by["general"]["metric"] == "perplexity" and not by["general"]["higher_is_better"]
    f = record["forgetting"]
    assert f["suite"] == "general" and f["before"] == by["general"]["before"]["perplexity"]
    assert f["regressed"] == (f["change"] > 0.5)
    rows = [json.loads(x) for x in (sft_run / gen["samples_after"]).read_text().splitlines()]
    assert len(rows) == 256 and {"prompt", "reference", "completion", "score"} <= set(rows[0])
    assert sum(r["score"] for r in rows) / 256 == pytest.approx(gen["after"]["exact_match"])
    # The same fixture model, trained without the eval section (largest_task["sft"]), has the same weights:
    # evaluating does not disturb training.
    from safetensors.torch import load_file

    a, b = load_file(str(sft_run / "final" / "model.safetensors")), load_file(
        str(largest_task["sft"] / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_every_steps_logs_the_suites_during_training(sft_run):
    logged = [m for m in metrics(sft_run) if "suite/largest/exact_match" in m]
    assert [m["step"] for m in logged] == [40, 80]
    assert logged[-1]["suite/largest/exact_match"] == pytest.approx(
        json.loads((sft_run / "eval.json").read_text())["suites"][0]["after"]["exact_match"])


def test_posttrain_eval_gives_the_numbers_the_stage_gave(sft_run, largest_task, suites, tmp_path):
    from posttrain.config import load_config
    from posttrain.eval.runner import run_eval

    cfg = load_config(None, raw=sft_config(largest_task, tmp_path / "unused", suites))
    path = run_eval(cfg, model_path=str(sft_run / "final"), compare=str(largest_task["base"]),
                    out_dir=tmp_path / "ev", log=lambda *a, **k: None)
    ours = {s["name"]: s for s in json.loads(path.read_text())["suites"]}
    stage = {s["name"]: s for s in json.loads((sft_run / "eval.json").read_text())["suites"]}
    for name in stage:
        for when in ("before", "after"):
            assert ours[name][when] == pytest.approx(stage[name][when], rel=1e-5), (name, when)


def test_forgetting_is_measured_in_the_metric_s_bad_direction():
    from posttrain.config import EvalConfig
    from posttrain.eval.runner import forgetting
    from posttrain.eval.suites import SuiteResult

    ecfg = EvalConfig(suites=[{"name": "g", "type": "perplexity", "path": "x"},
                              {"name": "q", "type": "generation", "path": "y"}],
                      forgetting={"suite": "g", "threshold": 0.1})
    ppl = lambda v: {"g": SuiteResult({"perplexity": v}, 1, "perplexity", False)}  # noqa: E731
    f = forgetting(ecfg, ppl(10.0), ppl(12.0))
    assert f["change"] == pytest.approx(0.2) and f["regressed"]
    assert not forgetting(ecfg, ppl(10.0), ppl(9.0))["regressed"]
    ecfg.forgetting.suite = "q"
    acc = lambda v: {"q": SuiteResult({"exact_match": v}, 1, "exact_match")}  # noqa: E731
    f = forgetting(ecfg, acc(0.5), acc(0.4))
    assert f["change"] == pytest.approx(0.2) and f["regressed"]


def test_win_rate_against_the_base_model_by_a_judge_server(largest_task, tmp_path):
    from posttrain.config import EvalSuite
    from posttrain.eval.suites import run_suite
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.config import ModelConfig
    from tests.judge_server import serve

    def digit_wins(request):
        text = request["messages"][-1]["content"]
        a = re.search(r"\[Response A\]\n(.*?)\n\[End of Response A\]", text, re.DOTALL).group(1)
        return "A" if re.fullmatch(r"\d", a.strip()) else "B"

    base_url, stop = serve(digit_wins)
    try:
        suite = EvalSuite(name="vs_base", type="win_rate", path=str(largest_task["eval"]), limit=16,
                          max_new_tokens=4, baseline=str(largest_task["base"]),
                          judge={"base_url": base_url, "model": "judge", "rubric": "A single digit wins."})
        mcfg = ModelConfig(name_or_path=str(largest_task["sft"]))
        result = run_suite(suite, load_model(mcfg), load_tokenizer(mcfg), max_seq_len=64)
    finally:
        stop()
    # The SFT model answers with one digit, the random base model never does: it wins every pair.
    assert result.metrics["win_rate"] == 1.0 and result.metrics["wins"] == 1.0 and result.n == 16


def test_reward_model_suite_and_win_rate_by_reward_model(largest_task, preference_data, tmp_path):
    from posttrain.config import EvalSuite, ModelConfig
    from posttrain.eval.suites import run_suite
    from posttrain.models.load import load_model, load_tokenizer
    from tests.conftest import preference_config

    rm = run(preference_config(largest_task["sft"], preference_data, tmp_path / "rm", "reward",
                               training={"max_steps": 5, "eval_steps": None}))
    mcfg = ModelConfig(name_or_path=str(largest_task["sft"]))
    model, tok = load_model(mcfg), load_tokenizer(mcfg)
    scored = run_suite(EvalSuite(name="rm", type="reward_model", path=str(largest_task["eval"]), limit=8,
                                 max_new_tokens=4, reward_model=str(rm)), model, tok, max_seq_len=64)
    assert scored.metrics["reward"] == pytest.approx(sum(s["score"] for s in scored.samples) / 8)
    # Against itself every pair ties: the same greedy answers get the same score.
    same = run_suite(EvalSuite(name="self", type="win_rate", path=str(largest_task["eval"]), limit=8,
                               max_new_tokens=4, baseline=str(largest_task["sft"]), reward_model=str(rm)),
                     model, tok, max_seq_len=64)
    assert same.metrics["win_rate"] == 0.5 and same.metrics["ties_or_undecided"] == 1.0


def test_lm_eval_is_skipped_cleanly_without_it_and_bridged_with_it(largest_task, monkeypatch):
    from posttrain.config import EvalSuite, ModelConfig
    from posttrain.eval.suites import run_suite

    suite = EvalSuite(name="std", type="lm_eval", tasks=["gsm8k"], limit=5)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    skipped = run_suite(suite, *_model(largest_task), max_seq_len=64)
    assert skipped.skipped and "not installed" in skipped.skipped

    seen = {}
    fake = types.ModuleType("lm_eval")
    fake_models = types.ModuleType("lm_eval.models")
    fake_hf = types.ModuleType("lm_eval.models.huggingface")

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen["model"] = pretrained

    def simple_evaluate(model, tasks, num_fewshot, limit):
        seen.update(tasks=tasks, limit=limit)
        return {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                                      "exact_match_stderr,strict-match": 0.1}}}

    fake.simple_evaluate, fake_hf.HFLM = simple_evaluate, HFLM
    for name, mod in (("lm_eval", fake), ("lm_eval.models", fake_models), ("lm_eval.models.huggingface", fake_hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    result = run_suite(suite, *_model(largest_task), max_seq_len=64)
    assert result.metrics == {"gsm8k/exact_match": 0.25} and result.metric == "gsm8k/exact_match"
    assert seen["tasks"] == ["gsm8k"] and seen["limit"] == 5 and seen["model"] is not None


def _model(task):
    from posttrain.config import ModelConfig
    from posttrain.models.load import load_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(task["sft"]))
    return load_model(mcfg), load_tokenizer(mcfg)


def test_bad_multiple_choice_rows_name_file_row_and_field(tmp_path, largest_task):
    from posttrain.config import EvalSuite
    from posttrain.errors import DataError
    from posttrain.eval.suites import run_suite

    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n'
                   '{"question": "q?", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(DataError, match=r"mc\.jsonl:2: field 'answer'"):
        run_suite(EvalSuite(name="mc", type="multiple_choice", path=str(bad)), *_model(largest_task), max_seq_len=64)


def test_eval_config_is_checked():
    from posttrain.config import EvalConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs exactly one of judge or reward_model"):
        EvalConfig(suites=[{"name": "w", "type": "win_rate", "path": "p", "baseline": "b"}])
    with pytest.raises(ValidationError, match="is not a suite"):
        EvalConfig(suites=[{"name": "a", "type": "perplexity", "path": "p"}], forgetting={"suite": "b"})
    with pytest.raises(ValidationError, match="unique"):
        EvalConfig(suites=[{"name": "a", "type": "perplexity", "path": "p"}] * 2)


def test_a_resumed_stage_keeps_its_before_numbers(largest_task, suites, tmp_path, monkeypatch):
    import posttrain.eval.runner as runner

    out = tmp_path / "sft"
    cfg = sft_config(largest_task, out, suites[:1])
    cfg["eval"].pop("forgetting")
    cfg["training"].update(max_steps=2, save_steps=1)
    run(cfg)
    first = json.loads((out / "eval.json").read_text())["suites"][0]
    calls = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: calls.append(k["samples_dir"]) or real(*a, **k))
    cfg["training"]["max_steps"] = 3
    run(cfg, resume=True)
    again = json.loads((out / "eval.json").read_text())["suites"][0]
    # Only the final model is evaluated again; the start's numbers and samples carry over from the first run.
    assert [p.name for p in calls] == ["after"]
    assert again["before"] == first["before"] and again["samples_before"] == first["samples_before"] is not None
