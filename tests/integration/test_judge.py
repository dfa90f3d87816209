"""LLM judges end to end against a tiny OpenAI-compatible server (tests/judge_server.py) and a local model."""

import re
import threading
import time

import pytest

from posttrain.rl.rewards import (
    CombinedReward,
    ExactMatch,
    JudgeClient,
    JudgeReward,
    LocalJudge,
    PairwiseJudge,
    RewardInput,
    build_reward,
)
from tests.judge_server import serve

RUBRIC = "The response must give the correct sum."
QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


def arithmetic_judge(request: dict) -> str:
    """Pairwise: the response holding the right sum. Pointwise: always 8."""
    text = request["messages"][-1]["content"]
    if "[Response A]" in text:
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", text).groups())
        response_a = re.search(r"\[Response A\]\n(.*?)\n\[End of Response A\]", text, re.DOTALL).group(1)
        return "A" if str(a + b) in response_a else "B"
    return "Score: 8"


@pytest.fixture
def server():
    """serve() with a handler that the test sets; the requests seen are recorded."""
    state = {"handler": arithmetic_judge, "requests": []}

    def handler(request):
        state["requests"].append(request)
        return state["handler"](request)

    base_url, stop = serve(handler)
    state["base_url"] = base_url
    yield state
    stop()


def client(server, **kw) -> JudgeClient:
    return JudgeClient(server["base_url"], "test-judge", **{"retry_backoff": 0.0, **kw})


def sample(completion: str, reference: str | None = "42") -> RewardInput:
    return RewardInput(QUESTION, completion, reference)


def test_judge_reward_end_to_end(server):
    judge = JudgeReward(client(server), RUBRIC, scale=(1, 10))
    assert judge([sample("42"), sample("41", None)]) == [pytest.approx(7 / 9)] * 2
    first = server["requests"][0]
    assert first["model"] == "test-judge" and first["temperature"] == 0
    prompts = sorted(r["messages"][-1]["content"] for r in server["requests"])
    assert RUBRIC in prompts[0] and "What is 12 + 30?" in prompts[0]
    assert sum("[Reference answer]\n42" in p for p in prompts) == 1  # only the sample with a reference


@pytest.mark.parametrize("reply, score", [("Score: 10", 1.0), ("score:1", 0.0), ("Score: 11. No, 5.5", 0.5),
                                          ("I cannot judge this.", None), ("Score: 42", None)])
def test_judge_reply_parsing(server, reply, score):
    server["handler"] = lambda request: reply
    assert JudgeReward(client(server), RUBRIC)([sample("42")]) == [score if score is None else pytest.approx(score)]


def test_unparsable_reply_is_masked_with_a_reason(server):
    server["handler"] = lambda request: "Both look fine to me."
    result = CombinedReward([ExactMatch(), JudgeReward(client(server), RUBRIC)], [1.0, 1.0])([sample("42")])
    assert result.total == [None] and result.masked == 1
    assert result.components["exact_match"] == [1.0]
    assert "no score" in result.errors[0]


def test_pairwise_judge_end_to_end(server):
    pairwise = PairwiseJudge(client(server), RUBRIC)
    assert pairwise.compare(QUESTION, "12 + 30 = 42", "It is 41.") == 0
    assert pairwise.compare(QUESTION, "It is 41.", "42") == 1
    assert len(server["requests"]) == 4  # each pair asked twice, in both orders
    assert pairwise.compare_many([("What is 1 + 2?", "3", "4"), ("What is 5 + 5?", "11", "10")]) == [0, 1]


def test_position_bias_gives_none(server):
    server["handler"] = lambda request: "A"  # always prefers whatever comes first
    assert PairwiseJudge(client(server), RUBRIC).compare(QUESTION, "42", "41") is None
    server["handler"] = lambda request: "I like both."
    assert PairwiseJudge(client(server), RUBRIC).compare(QUESTION, "42", "41") is None


@pytest.mark.parametrize(
    "reply, choice",
    [("B", "B"), ("**A**", "A"), ("[[B]]", "B"), ("A.\nIt is correct.", "A"), ("Response B is better.", "B"),
     ("A clear winner: Response B", "B"), ("A clear winner", None), ("A or B", None), ("", None)],
)
def test_parse_choice(reply, choice):
    from posttrain.rl.rewards.judge import parse_choice

    assert parse_choice(reply) == choice


def test_server_error_is_retried_then_masked(server):
    server["handler"] = lambda request: (500, "the judge is down")
    judge = JudgeReward(client(server, max_retries=2), RUBRIC)
    result = CombinedReward([ExactMatch(), judge], [1.0, 1.0])([sample("42")])
    assert result.total == [None] and result.masked == 1
    assert len(server["requests"]) == 3
    assert "HTTP 500 the judge is down" in " ".join(result.errors)


def test_client_error_is_not_retried(server):
    server["handler"] = lambda request: (400, "bad model name")
    assert JudgeReward(client(server, max_retries=2), RUBRIC)([sample("42")]) == [None]
    assert len(server["requests"]) == 1


def test_hanging_server_is_masked_not_raised(server):
    release = threading.Event()
    server["handler"] = lambda request: (release.wait(10), "Score: 8")[1]
    try:
        start = time.monotonic()
        judge = JudgeReward(client(server, timeout=0.3, max_retries=0), RUBRIC)
        assert judge([sample("42"), sample("41")]) == [None, None]
        assert PairwiseJudge(client(server, timeout=0.3, max_retries=0), RUBRIC).compare(QUESTION, "42", "41") is None
        # A CombinedReward timeout bounds the call even with a patient client.
        patient = JudgeReward(client(server, timeout=30, max_retries=0), RUBRIC)
        result = CombinedReward([patient], [1.0], timeout=0.3)([sample("42")])
        assert result.total == [None] and "timed out" in result.errors[0]
        assert time.monotonic() - start < 5
    finally:
        release.set()


def test_unreachable_endpoint_is_masked():
    judge = JudgeReward(JudgeClient("http://127.0.0.1:9/v1", "m", timeout=1, max_retries=0), RUBRIC)  # nothing listens
    assert judge([sample("42")]) == [None]
    assert judge.last_errors and "failed" in judge.last_errors[0]


def test_local_judge_runs_a_model_without_a_server(tiny_model):
    local = LocalJudge(tiny_model, max_new_tokens=4)
    reply = local.chat([{"role": "user", "content": "Say a number."}])
    assert isinstance(reply, str)
    scores = JudgeReward(local, RUBRIC)([sample("42"), sample("41")])
    assert len(scores) == 2 and all(s is None or 0.0 <= s <= 1.0 for s in scores)
    assert PairwiseJudge(local, RUBRIC).compare(QUESTION, "42", "41") in (0, 1, None)
    judge = build_reward({"type": "local_judge", "path": str(tiny_model), "rubric": RUBRIC, "max_new_tokens": 2})
    assert len(judge([sample("42")])) == 1
