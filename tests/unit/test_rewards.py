import math
import random
import threading
import time

import pytest

from posttrain.data.synthetic.tasks import make_task_rows, wrong_answer
from posttrain.errors import PosttrainError
from posttrain.rl.rewards import (
    CombinedReward,
    ExactMatch,
    LengthPenalty,
    NumericMatch,
    PythonReward,
    RegexReward,
    RewardInput,
    build_reward,
    build_rewards,
    extract_number,
)

USER = [{"role": "user", "content": "What is 12 + 30?"}]


def x(completion: str, reference: str | None = None, **metadata) -> RewardInput:
    return RewardInput(USER, completion, reference, metadata)


class Fixed:
    """A reward that returns given scores (or raises given exceptions) per completion."""

    def __init__(self, name: str, table: dict):
        self.name = name
        self.table = table
        self.calls: list[int] = []  # batch sizes it was called with

    def __call__(self, inputs):
        self.calls.append(len(inputs))
        out = []
        for item in inputs:
            value = self.table[item.completion]
            if isinstance(value, Exception):
                raise value
            out.append(value)
        return out


# ---- rules -------------------------------------------------------------------------------------


def test_exact_match():
    assert ExactMatch()([x("42", "42"), x(" 42\n", "42"), x("43", "42"), x("42")]) == [1.0, 1.0, 0.0, None]
    assert ExactMatch(strip=False)([x(" 42", "42")]) == [0.0]
    assert ExactMatch()([x("HELLO", "hello")]) == [0.0]
    assert ExactMatch(case_sensitive=False)([x("HELLO", "hello")]) == [1.0]


def test_exact_match_on_synthetic_tasks():
    rng = random.Random(0)
    rows = make_task_rows(40, seed=0)
    right = ExactMatch()([x(r["answer"], r["answer"]) for r in rows])
    wrong = ExactMatch()([x(wrong_answer(r["task"], r["answer"], rng), r["answer"]) for r in rows])
    assert right == [1.0] * 40 and wrong == [0.0] * 40


@pytest.mark.parametrize(
    "text, number",
    [
        ("The answer is 1,234.", "1234"),
        ("-3", "-3"),
        ("\\boxed{42}", "42"),
        ("first 7, then \\boxed{42} and finally 9", "42"),
        ("\\boxed{x = -2.5}", "-2.5"),
        ("12 + 30 = 42", "42"),
        ("5-3", "3"),  # a minus after a digit is subtraction, not a sign
        ("costs $1,234.50 total", "1234.50"),
        ("1,2345", "2345"),  # not a thousands group
        ("it is 3.", "3"),
        ("no number here", None),
    ],
)
def test_extract_number(text, number):
    got = extract_number(text)
    assert (got is None) if number is None else (got == type(got)(number))


def test_numeric_match():
    reward = NumericMatch()
    assert reward([x("The answer is 1,234.", "1234"), x("-3", "-3"), x("\\boxed{42}", "42"),
                   x("no number", "42"), x("41", "42"), x("42")]) == [1.0, 1.0, 1.0, 0.0, 0.0, None]
    assert reward([x("42.0000001", "42")]) == [1.0]
    assert NumericMatch(tolerance=0.01)([x("3.14", "3.1416"), x("3.1", "3.1416")]) == [1.0, 0.0]
    assert reward([x("42", "not a number")]) == [None]
    assert reward([x("12345678901234567891", "12345678901234567890")]) == [0.0]  # no float rounding


def test_regex_reward():
    fmt = RegexReward(r"^\d+$")
    assert fmt([x("42"), x("forty-two")]) == [1.0, 0.0]
    no_think = RegexReward(r"<think>", must_match=False, score=0.5)
    assert no_think([x("42"), x("<think>hm</think>42")]) == [0.5, 0.0]
    with pytest.raises(PosttrainError, match="not a valid regular expression"):
        RegexReward("(")


def test_length_penalty():
    chars = LengthPenalty(max_chars=5, per_unit=0.1)
    assert chars([x("abc"), x("abcde"), x("abcdefgh")]) == [0.0, 0.0, pytest.approx(-0.3)]
    words = LengthPenalty(max_tokens=2)
    assert words([x("one two"), x("one two three four")]) == [0.0, pytest.approx(-0.02)]

    class CharTokenizer:
        def encode(self, text, add_special_tokens=False):
            return list(text)

    assert LengthPenalty(max_tokens=2, per_unit=1, tokenizer=CharTokenizer())([x("abcd")]) == [-2.0]
    with pytest.raises(PosttrainError, match="exactly one"):
        LengthPenalty()
    with pytest.raises(PosttrainError, match="exactly one"):
        LengthPenalty(max_chars=1, max_tokens=1)


# ---- python functions --------------------------------------------------------------------------


def test_python_reward_from_file(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text(
        "def keywords(prompt, completion, reference, metadata):\n"
        "    if reference is None:\n"
        "        return None\n"
        "    return float(completion.strip() == reference) + metadata.get('bonus', 0)\n"
        "\n"
        "def one(sample):\n"
        "    return len(sample.completion)\n"
        "\n"
        "def wrong_args(text):\n"
        "    return 0\n"
        "def two_args(a, b):\n"
        "    return 0\n"
        "CONSTANT = 3\n"
    )
    kw = PythonReward(f"{file}:keywords")
    assert kw.name == "keywords"
    assert kw([x("42", "42"), x("41", "42", bonus=0.5), x("42")]) == [1.0, 0.5, None]
    assert PythonReward(f"{file}:one")([x("abc")]) == [3.0]
    with pytest.raises(PosttrainError, match="keyword arguments"):
        PythonReward(f"{file}:two_args")
    with pytest.raises(PosttrainError, match="has no attribute 'missing'"):
        PythonReward(f"{file}:missing")
    with pytest.raises(PosttrainError, match="not a function"):
        PythonReward(f"{file}:CONSTANT")
    with pytest.raises(PosttrainError, match="does not exist"):
        PythonReward(f"{tmp_path}/nope.py:f")
    with pytest.raises(PosttrainError, match="module:function"):
        PythonReward("no_colon_here")


def test_python_reward_from_module(tmp_path, monkeypatch):
    (tmp_path / "reward_mod_for_test.py").write_text("def r(sample):\n    return 2\n")
    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert PythonReward("reward_mod_for_test:r")([x("a")]) == [2.0]
    with pytest.raises(PosttrainError, match="broken_reward_mod:r.*RuntimeError: broken on import"):
        PythonReward("broken_reward_mod:r")
    with pytest.raises(PosttrainError, match="no_such_module_xyz:f"):
        PythonReward("no_such_module_xyz:f")


def test_python_reward_returning_a_non_number_masks_the_sample(tmp_path):
    file = tmp_path / "bad.py"
    file.write_text("def r(sample):\n    return 'high' if sample.completion == 'a' else 1\n")
    result = CombinedReward([PythonReward(f"{file}:r")], [1.0])([x("a"), x("b")])
    assert result.total == [None, 1.0]
    assert result.masked == 1 and "expected a number" in " ".join(result.errors)


# ---- combination and masking -------------------------------------------------------------------


def test_combined_weights():
    a = Fixed("a", {"p": 1.0, "q": 0.0})
    b = Fixed("b", {"p": -2.0, "q": 4.0})
    result = CombinedReward([a, b], [0.5, 0.25])([x("p"), x("q")])
    assert result.total == [pytest.approx(0.0), pytest.approx(1.0)]
    assert result.components == {"a": [1.0, 0.0], "b": [-2.0, 4.0]}
    assert result.masked == 0 and result.errors == []
    assert a.calls == [2]  # one batched call


def test_duplicate_names_get_suffixes():
    combined = CombinedReward([ExactMatch(), ExactMatch(), RegexReward("x")], [1, 1, 1])
    assert combined.names == ["exact_match", "exact_match_2", "regex"]


def test_a_raising_sample_masks_only_itself():
    flaky = Fixed("flaky", {"ok": 1.0, "bad": ValueError("cannot parse"), "ok2": 0.5})
    steady = Fixed("steady", {"ok": 1.0, "bad": 1.0, "ok2": 1.0})
    result = CombinedReward([flaky, steady], [1.0, 1.0])([x("ok"), x("bad"), x("ok2")])
    assert result.total == [2.0, None, 1.5]
    assert result.components["flaky"] == [1.0, None, 0.5]
    assert result.components["steady"] == [1.0, 1.0, 1.0]
    assert result.masked == 1
    assert flaky.calls == [3, 1, 1, 1]  # the batch, then one sample at a time
    assert any("cannot parse" in e and "sample 1" in e for e in result.errors)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), "high"])
def test_none_nan_inf_and_non_numbers_mask(bad):
    result = CombinedReward([Fixed("r", {"a": 1.0, "b": bad})], [1.0])([x("a"), x("b")])
    assert result.total == [1.0, None]
    assert result.masked == 1
    assert result.components["r"] == [1.0, None]
    assert bool(result.errors) == (bad is not None)  # None is "cannot score", not an error


def test_wrong_number_of_scores_falls_back_to_one_at_a_time():
    class Short:
        name = "short"

        def __call__(self, inputs):
            return [1.0] * max(1, len(inputs) - 1)

    result = CombinedReward([Short()], [1.0])([x("a"), x("b"), x("c")])
    assert result.total == [1.0, 1.0, 1.0]
    assert "returned 2 scores for 3 samples" in result.errors[0]


def test_timeout_masks_the_call_and_returns_promptly():
    release = threading.Event()

    class Slow:
        name = "slow"

        def __call__(self, inputs):
            release.wait(10)
            return [1.0] * len(inputs)

    fast = Fixed("fast", {"a": 1.0, "b": 2.0})
    combined = CombinedReward([fast, Slow()], [1.0, 1.0], timeout=0.2)
    try:
        start = time.monotonic()
        result = combined([x("a"), x("b")])
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert elapsed < 2
    assert result.total == [None, None] and result.masked == 2
    assert result.components == {"fast": [1.0, 2.0], "slow": [None, None]}
    assert "timed out" in result.errors[0]


def test_retries_after_a_failed_batch_share_one_timeout():
    class FailsBatchesThenHangs:
        name = "hangs"

        def __call__(self, inputs):
            if len(inputs) > 1:
                raise RuntimeError("batch failed")
            time.sleep(0.15)
            return [1.0]

    start = time.monotonic()
    result = CombinedReward([FailsBatchesThenHangs()], [1.0], timeout=0.4)([x(str(i)) for i in range(20)])
    assert time.monotonic() - start < 2
    assert result.total[0] == 1.0 and result.masked >= 15
    assert len(result.errors) <= 5


def test_errors_are_capped_and_nothing_raises():
    always = Fixed("always", {str(i): KeyError(f"boom {i}") for i in range(20)})
    result = CombinedReward([always], [1.0])([x(str(i)) for i in range(20)])
    assert result.total == [None] * 20 and result.masked == 20
    assert len(result.errors) == 5


def test_empty_batch():
    result = CombinedReward([ExactMatch()], [1.0], timeout=1)([])
    assert (result.total, result.masked, result.components) == ([], 0, {"exact_match": []})


@pytest.mark.parametrize(
    "rewards, weights, timeout, message",
    [
        ([], [], None, "at least one"),
        ([ExactMatch()], [1, 2], None, "1 reward.*2 weight"),
        ([ExactMatch()], [math.nan], None, "finite"),
        ([ExactMatch()], [1.0], 0, "timeout"),
    ],
)
def test_combined_reward_config_errors(rewards, weights, timeout, message):
    with pytest.raises(PosttrainError, match=message):
        CombinedReward(rewards, weights, timeout=timeout)


# ---- building from config ----------------------------------------------------------------------


def test_build_rewards_from_config(tmp_path):
    (tmp_path / "fmt.py").write_text("def short(sample):\n    return 1.0 if len(sample.completion) < 4 else 0.0\n")
    combined = build_rewards([
        {"type": "exact_match"},
        {"type": "numeric_match", "tolerance": 0.01, "weight": 2.0},
        {"type": "regex", "pattern": r"^\d+$", "must_match": True, "weight": 0.5, "name": "digits_only"},
        {"type": "length_penalty", "max_chars": 3, "per_unit": 0.1},
        {"type": "python", "function": f"{tmp_path / 'fmt.py'}:short"},
    ])
    assert combined.names == ["exact_match", "numeric_match", "digits_only", "length_penalty", "short"]
    assert combined.weights == [1.0, 2.0, 0.5, 1.0, 1.0]
    result = combined([x("42", "42"), x("= 42.", "42")])
    assert result.total == [pytest.approx(1 + 2 + 0.5 + 0 + 1), pytest.approx(0 + 2 + 0 - 0.2 + 0)]


def test_build_judge_reads_the_api_key_from_the_environment(monkeypatch):
    spec = {"type": "judge", "base_url": "http://127.0.0.1:9/v1", "model": "m", "rubric": "be right",
            "api_key_env": "POSTTRAIN_TEST_JUDGE_KEY"}
    monkeypatch.setenv("POSTTRAIN_TEST_JUDGE_KEY", "sk-test")
    judge = build_reward(spec)
    assert judge.client.api_key == "sk-test" and judge.client.url == "http://127.0.0.1:9/v1/chat/completions"
    monkeypatch.delenv("POSTTRAIN_TEST_JUDGE_KEY")
    with pytest.raises(PosttrainError, match="POSTTRAIN_TEST_JUDGE_KEY is not set"):
        build_reward(spec, 3)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([], "non-empty list"),
        ([{"type": "exact_match"}, {"type": "bleu"}], r"rewards\[1\]: field 'type' is 'bleu'; allowed: exact_match"),
        ([{"pattern": "x"}], r"rewards\[0\]: field 'type' is missing"),
        (["exact_match"], r"rewards\[0\]: expected a mapping"),
        ([{"type": "regex"}], r"rewards\[0\] \(type regex\): field 'pattern' is required"),
        ([{"type": "numeric_match", "tol": 0.1}], r"unknown field 'tol'; allowed: type, tolerance, weight, name"),
        ([{"type": "numeric_match", "tolerance": -1}], r"field 'tolerance' is -1; expected a number >= 0"),
        ([{"type": "exact_match", "weight": "high"}], r"field 'weight' is 'high'; expected a number"),
        ([{"type": "exact_match", "strip": "yes"}], r"field 'strip' is 'yes'; expected true or false"),
        ([{"type": "length_penalty", "per_unit": 0.1}], r"rewards\[0\] \(type length_penalty\).*max_chars or max_tokens"),
        ([{"type": "judge", "base_url": "http://x/v1", "model": "m"}], r"field 'rubric' is required"),
        ([{"type": "judge", "base_url": "http://x", "model": "m", "rubric": "r", "scale": [10, 1]}], "field 'scale'"),
        ([{"type": "python", "function": "no_such_module_xyz:f"}], r"rewards\[0\] \(type python\).*no_such_module_xyz"),
        ([{"type": "reward_model", "path": "/no/such/reward/model"}], r"rewards\[0\] \(type reward_model\).*cannot load"),
    ],
)
def test_build_rewards_errors(specs, message):
    with pytest.raises(PosttrainError, match=message):
        build_rewards(specs)


# ---- reward model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_model, tmp_path_factory):
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    cfg = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model.config.pad_token_id = tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_reward_model_reward_scores_the_prompt_and_completion(tiny_reward_model):
    from posttrain.eval.reward_score import RewardScorer

    reward = build_reward({"type": "reward_model", "path": str(tiny_reward_model), "batch_size": 2})
    samples = [x("42"), x("41 is the answer"), x("forty-two")]
    scores = reward(samples)
    expected = RewardScorer(tiny_reward_model).score([USER + [{"role": "assistant", "content": s.completion}]
                                                       for s in samples])
    assert scores == pytest.approx(expected)
    assert len(set(scores)) == 3


def test_reward_model_masks_what_it_cannot_score(tiny_reward_model):
    reward = build_reward({"type": "reward_model", "path": str(tiny_reward_model)})
    too_long = x("word " * 3000)
    result = CombinedReward([reward], [1.0])([x("42"), too_long])
    assert result.total[0] is not None and result.total[1] is None
    assert "too long" in result.errors[0]
