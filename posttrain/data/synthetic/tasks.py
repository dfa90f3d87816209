"""Verifiable instruction tasks: every prompt has exactly one correct answer.

They give the tiny model something learnable whose success can be checked by
string comparison (SFT accuracy, rule-based RL rewards) without any judge.
Each generator takes a ``random.Random`` and returns ``(prompt, answer)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from posttrain.errors import PosttrainError

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_PHRASE_WORDS = tuple(
    "blue sky red apple green tree quiet river small house bright star cold water "
    "warm bread fast car old book happy dog soft rain tall hill dark night".split()
)


def _word(rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> str:
    # Pronounceable consonant-vowel words give thousands of distinct prompts
    # while staying made of the common letter pairs the tiny BPE learns.
    syllables = rng.randint(min_syllables, max_syllables)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f'Reverse the word "{word}".', word[::-1]


def upper(rng: random.Random) -> tuple[str, str]:
    phrase = " ".join(rng.choice(_PHRASE_WORDS) for _ in range(rng.randint(2, 3)))
    return f'Write "{phrase}" in uppercase.', phrase.upper()


def count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 4)
    # Mostly ask about a letter that occurs, so answers are not dominated by 0.
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(_CONSONANTS + _VOWELS)
    return f'How many times does the letter "{letter}" appear in "{word}"?', str(word.count(letter))


def larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def largest(rng: random.Random) -> tuple[str, str]:
    digits = rng.sample(range(10), 4)
    return f"What is the largest of {', '.join(map(str, digits))}?", str(max(digits))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": add,
    "reverse": reverse,
    "upper": upper,
    "count": count,
    "larger": larger,
    "largest": largest,
}

FORMATS = ("messages", "alpaca")


def _wrong_largest(answer: int, rng: random.Random) -> str:
    # Half the time a digit above the largest (so not in the list), the mistake models make most.
    above = list(range(answer + 1, 10))
    if above and rng.random() < 0.5:
        return str(rng.choice(above))
    return str(rng.choice([d for d in range(10) if d != answer]))


def _swap_two(text: str, rng: random.Random) -> str:
    i = rng.randrange(len(text) - 1)
    swapped = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return swapped if swapped != text else text[::-1]


# Near misses, so a preference between the right and the wrong answer is about correctness, not form.
WRONG: dict[str, Callable[[str, random.Random], str]] = {
    "add": lambda ans, rng: str(int(ans) + rng.choice([-10, -2, -1, 1, 2, 10])),
    "reverse": lambda ans, rng: ans[::-1] if rng.random() < 0.5 else _swap_two(ans, rng),
    "upper": lambda ans, rng: ans.lower() if rng.random() < 0.5 else ans.title(),
    "count": lambda ans, rng: str(int(ans) + 1 if int(ans) == 0 or rng.random() < 0.5 else int(ans) - 1),
    "larger": lambda ans, rng: str(int(ans) - rng.randint(1, 9)),
    "largest": lambda ans, rng: _wrong_largest(int(ans), rng),
}


def wrong_answer(task: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to a task item (never the right one)."""
    wrong = WRONG[task](answer, rng)
    return wrong if wrong != answer else answer + "!"


def make_preference_rows(n: int, seed: int, tasks: Sequence[str] = ("add", "reverse", "upper", "count")) -> list[dict]:
    """``n`` preference rows: {"prompt", "chosen": right answer, "rejected": near miss, "task", "answer"}."""
    rng = random.Random(f"{seed}-wrong")
    rows = []
    for row in make_task_rows(n, seed, tasks):
        prompt = row["messages"][0]["content"]
        wrong = wrong_answer(row["task"], row["answer"], rng)
        rows.append({"prompt": prompt, "chosen": row["answer"], "rejected": wrong, "task": row["task"],
                     "answer": row["answer"], "reject_reason": "wrong answer"})
    return rows


def make_feedback_rows(n: int, seed: int, tasks: Sequence[str] = ("add", "reverse", "upper", "count")) -> list[dict]:
    """``n`` KTO rows: {"prompt", "completion", "label"}, alternately a right (True) and a wrong (False) answer."""
    rng = random.Random(f"{seed}-wrong")
    rows = []
    for i, row in enumerate(make_task_rows(n, seed, tasks)):
        good = (i // len(tasks)) % 2 == 0  # alternate per cycle of tasks, so no task is always one label
        completion = row["answer"] if good else wrong_answer(row["task"], row["answer"], rng)
        rows.append({"prompt": row["messages"][0]["content"], "completion": completion, "label": good,
                     "task": row["task"], "answer": row["answer"]})
    return rows


def make_task_rows(
    n: int,
    seed: int,
    tasks: Sequence[str] = ("add", "reverse", "upper", "count"),
    fmt: str = "messages",
) -> list[dict]:
    """``n`` rows cycling through ``tasks`` in order, so every task gets an equal share.

    ``fmt="messages"``: {"messages": [user, assistant], "task", "answer"}.
    ``fmt="alpaca"``: {"instruction": prompt, "input": "", "output": answer, "task", "answer"}.
    The same ``seed`` always gives the same rows.
    """
    if n < 0:
        raise PosttrainError(f"make_task_rows: n must be >= 0, got {n}")
    if not tasks:
        raise PosttrainError(f"make_task_rows: tasks is empty; allowed: {sorted(TASKS)}")
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise PosttrainError(f"make_task_rows: unknown task(s) {unknown}; allowed: {sorted(TASKS)}")
    if fmt not in FORMATS:
        raise PosttrainError(f"make_task_rows: fmt={fmt!r} is not supported; allowed: {list(FORMATS)}")

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = tasks[i % len(tasks)]
        prompt, answer = TASKS[name](rng)
        if fmt == "messages":
            row = {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
        else:
            row = {"instruction": prompt, "input": "", "output": answer}
        rows.append({**row, "task": name, "answer": answer})
    return rows


def _prompt_key(row: dict) -> tuple:
    if "messages" in row:
        return tuple((m["role"], m["content"]) for m in row["messages"] if m["role"] != "assistant")
    return (row["instruction"], row.get("input", ""))


def split_train_test(
    rows: Iterable[dict], test_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Split into (train, test) so that no prompt appears on both sides.

    Rows sharing a prompt stay together; about ``test_fraction`` of the distinct
    prompts go to test. Each side keeps the input order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise PosttrainError(f"split_train_test: test_fraction must be in [0, 1], got {test_fraction}")
    rows = list(rows)
    keys = list(dict.fromkeys(_prompt_key(row) for row in rows))
    random.Random(seed).shuffle(keys)
    test_keys = set(keys[: round(test_fraction * len(keys))])
    train = [row for row in rows if _prompt_key(row) not in test_keys]
    test = [row for row in rows if _prompt_key(row) in test_keys]
    return train, test


def make_prompt_rows(n: int, seed: int, tasks: Sequence[str] = ("add", "reverse", "upper", "count")) -> list[dict]:
    """``n`` prompts for online methods: {"prompt", "answer", "task"}; the answer is what exact-match rewards check."""
    return [{"prompt": row["messages"][0]["content"], "answer": row["answer"], "task": row["task"]}
            for row in make_task_rows(n, seed, tasks)]
