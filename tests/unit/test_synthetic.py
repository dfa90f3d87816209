import json
import re
from collections import defaultdict

import pytest

from posttrain.data.synthetic import (
    TASKS,
    make_domain_corpus,
    make_general_corpus,
    make_task_rows,
    split_train_test,
    tokenizer_corpus,
    write_jsonl,
)
from posttrain.errors import PosttrainError

SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def _solve(prompt: str) -> str:
    """An independent solver: recompute each task's answer from its prompt text."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r'Reverse the word "([a-z]+)"\.', prompt):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r'Write "([a-z ]+)" in uppercase\.', prompt):
        return m[1].upper()
    if m := re.fullmatch(r'How many times does the letter "([a-z])" appear in "([a-z]+)"\?', prompt):
        return str(sum(ch == m[1] for ch in m[2]))
    raise AssertionError(f"unrecognised prompt: {prompt!r}")


def test_every_answer_is_correct():
    rows = make_task_rows(400, seed=3)
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == row["answer"] == _solve(user["content"])


def test_add_uses_two_digit_operands():
    for row in make_task_rows(50, seed=0, tasks=("add",)):
        a, b = map(int, re.findall(r"\d+", row["messages"][0]["content"]))
        assert 10 <= a <= 99 and 10 <= b <= 99


def test_count_includes_absent_letters_sometimes_but_mostly_present():
    answers = [row["answer"] for row in make_task_rows(400, seed=0, tasks=("count",))]
    zeros = answers.count("0")
    assert 0 < zeros < len(answers) // 2


def test_tasks_cycle_evenly_and_all_are_registered():
    assert {"add", "reverse", "upper", "count"} <= set(TASKS)
    rows = make_task_rows(8, seed=0)
    assert [row["task"] for row in rows] == ["add", "reverse", "upper", "count"] * 2


def test_same_seed_same_rows_different_seed_different_rows():
    assert make_task_rows(40, seed=5) == make_task_rows(40, seed=5)
    assert make_task_rows(40, seed=5) != make_task_rows(40, seed=6)


def test_alpaca_format_carries_the_same_tasks():
    messages = make_task_rows(20, seed=1)
    alpaca = make_task_rows(20, seed=1, fmt="alpaca")
    for m, a in zip(messages, alpaca):
        assert set(a) == {"instruction", "input", "output", "task", "answer"}
        assert a["instruction"] == m["messages"][0]["content"]
        assert a["input"] == ""
        assert a["output"] == a["answer"] == m["answer"]
        assert a["task"] == m["task"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": ("add", "divide")}, "divide"),
        ({"tasks": ()}, "empty"),
        ({"fmt": "sharegpt"}, "sharegpt"),
        ({"n": -1}, "n must be"),
    ],
)
def test_bad_arguments_are_reported(kwargs, message):
    with pytest.raises(PosttrainError, match=message):
        make_task_rows(**{"n": 4, "seed": 0, **kwargs})


def _prompt(row):
    return row["messages"][0]["content"] if "messages" in row else row["instruction"] + row["input"]


@pytest.mark.parametrize("fmt", ["messages", "alpaca"])
def test_split_has_no_prompt_on_both_sides(fmt):
    # Repeated prompts (here exact copies) must all land on the same side.
    rows = make_task_rows(200, seed=0, fmt=fmt)
    rows += rows[:60]
    train, test = split_train_test(rows, test_fraction=0.25, seed=0)
    assert not {_prompt(r) for r in train} & {_prompt(r) for r in test}
    assert len(train) + len(test) == len(rows)
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, rows))
    distinct = len({_prompt(r) for r in rows})
    assert len({_prompt(r) for r in test}) == round(0.25 * distinct)


def test_split_is_deterministic_and_keeps_order():
    rows = make_task_rows(100, seed=2)
    train, test = split_train_test(rows, 0.2, seed=9)
    assert (train, test) == split_train_test(rows, 0.2, seed=9)
    assert train == [r for r in rows if r in train]
    assert test == [r for r in rows if r in test]


def test_split_rejects_fraction_outside_unit_interval():
    with pytest.raises(PosttrainError, match="test_fraction"):
        split_train_test(make_task_rows(4, seed=0), 1.5, seed=0)


def _sentences(doc):
    return len(SENTENCE_END.findall(doc))


def test_domain_corpus_is_regular_and_deterministic():
    docs = make_domain_corpus(200, seed=0)
    assert docs == make_domain_corpus(200, seed=0)
    assert docs != make_domain_corpus(200, seed=1)
    assert all(2 <= _sentences(doc) <= 6 for doc in docs)
    # A mineral keeps its colour whichever document (and seed) mentions it.
    colours = defaultdict(set)
    for doc in docs + make_domain_corpus(200, seed=1):
        name, colour = re.match(r"(\w+) is an? (\w+) mineral", doc).groups()
        colours[name].add(colour)
    assert len(colours) > 10
    assert all(len(c) == 1 for c in colours.values())


def test_general_corpus_looks_different_from_domain():
    docs = make_general_corpus(200, seed=0)
    assert docs == make_general_corpus(200, seed=0)
    assert all(2 <= _sentences(doc) <= 6 for doc in docs)
    assert not any("mineral" in doc or "hardness" in doc for doc in docs)


def test_tokenizer_corpus_is_fixed_and_covers_tasks_and_prose():
    corpus = tokenizer_corpus()
    assert corpus == tokenizer_corpus()
    text = "\n".join(corpus)
    for needle in ("mineral", "bakery", "What is", "uppercase", "assistant\n"):
        assert needle in text
    assert set("0123456789") <= set(text)
    assert "<|" not in text


def test_write_jsonl_round_trips_utf8_and_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    rows = [{"text": "naïve café 日本"}, {"messages": [{"role": "user", "content": "hi"}]}]
    assert write_jsonl(rows, path) == path
    raw = path.read_bytes().decode("utf-8")
    assert "naïve café 日本" in raw
    assert [json.loads(line) for line in raw.splitlines()] == rows

    write_jsonl(rows[:1], path)
    assert [json.loads(line) for line in path.read_text("utf-8").splitlines()] == rows[:1]
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_write_jsonl_keeps_old_file_when_a_row_cannot_be_written(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl([{"a": 1}], path)
    with pytest.raises(TypeError):
        write_jsonl([{"a": 2}, {"bad": object()}], path)
    assert path.read_text("utf-8") == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_larger_task_and_wrong_answers_are_checkable():
    import random

    from posttrain.data.synthetic.tasks import larger, wrong_answer

    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = larger(rng)
        a, b = (int(x) for x in prompt.removeprefix("Which is larger, ").removesuffix("?").split(" or "))
        assert a != b and answer == str(max(a, b))
        assert wrong_answer("larger", answer, rng) != answer


def test_largest_task_and_wrong_answers_are_checkable():
    import random

    from posttrain.data.synthetic.tasks import largest, wrong_answer

    rng = random.Random(0)
    above = 0
    for _ in range(200):
        prompt, answer = largest(rng)
        digits = [int(x) for x in prompt.removeprefix("What is the largest of ").removesuffix("?").split(", ")]
        assert len(set(digits)) == 4 and answer == str(max(digits))
        wrong = wrong_answer("largest", answer, rng)
        assert wrong != answer and wrong.isdigit() and len(wrong) == 1
        above += int(wrong) > int(answer)
    assert 60 < above < 160  # digits above the largest (absent from the list) are a common wrong answer


def test_prompt_rows_carry_the_answer_for_rewards():
    from posttrain.data.synthetic import make_prompt_rows

    rows = make_prompt_rows(8, seed=3, tasks=("add", "larger"))
    assert [r["task"] for r in rows] == ["add", "larger"] * 4
    for r in rows[::2]:
        a, b = (int(x) for x in r["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert r["answer"] == str(a + b)
