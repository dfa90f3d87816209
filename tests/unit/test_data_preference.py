"""Preference and feedback row schemas (data/preference.py), through normalise and load_examples."""

import json
import math

import pytest

from posttrain.data.formats import normalise
from posttrain.data.preference import FeedbackExample, PreferenceExample
from posttrain.data.validate import load_examples
from posttrain.errors import PosttrainError

F = "prefs.jsonl"


def norm(row, fmt="preference"):
    return normalise(row, fmt, file=F, row_no=7)


def issues(row, fmt="preference"):
    """(field, reason, detail) of every issue, asserting the row was rejected."""
    result = norm(row, fmt)
    assert isinstance(result, list) and result, f"expected issues, got {result!r}"
    assert all(i.file == F and i.row == 7 for i in result)
    return [(i.field, i.reason, i.detail) for i in result]


def reasons(row, fmt="preference"):
    return [(f, r) for f, r, _ in issues(row, fmt)]


def user(text="q"):
    return {"role": "user", "content": text}


def bot(text="a"):
    return {"role": "assistant", "content": text}


def system(text="s"):
    return {"role": "system", "content": text}


U, A, B = user(), bot("a"), bot("b")
CALL = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}
RESULT = {"role": "tool", "content": "42", "tool_call_id": "c1"}
FEEDBACK_HINT = "this row has 'chosen'/'rejected': it looks like preference data (format: preference)"
PREFERENCE_HINT = "this row has 'completion': it looks like feedback data (format: feedback)"
NO_PROMPT = "give 'prompt', or write 'chosen' and 'rejected' as the whole conversation, prompt first"
ACCEPTED = "true/false, 1/0, or one of 'up'/'down', 'true'/'false', 'good'/'bad', 'desirable'/'undesirable' (any case)"


# --- preference: accepted forms -----------------------------------------------------------------


def test_strings_become_one_user_and_one_assistant_turn():
    assert norm({"prompt": "q", "chosen": "a", "rejected": "b", "id": 1}) == PreferenceExample(
        F, 7, prompt=[U], chosen=[A], rejected=[B]
    )


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("a", [A]),
        (A, [A]),
        ({"role": "assistant", "content": [{"type": "text", "text": "a"}], "weight": 1}, [A]),
        ([A], [A]),
        ([CALL, RESULT, A], [CALL, RESULT, A]),  # a response alone may call tools before answering
        ([U, A], [A]),  # the whole conversation, prompt first
        ([U, CALL, RESULT, A], [CALL, RESULT, A]),
    ],
)
def test_response_forms(response, expected):
    ex = norm({"prompt": "q", "chosen": response, "rejected": "b"})
    assert (ex.prompt, ex.chosen, ex.rejected) == ([U], expected, [B])


def test_prompt_as_a_list_of_messages_with_tools_and_text_parts():
    prompt = [
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": "what is 6 x 7?"},
        CALL,
        RESULT,
    ]
    ex = norm({"prompt": prompt, "chosen": "42", "rejected": [*prompt, bot("41")]})
    assert ex.prompt == [system(), user("what is 6 x 7?"), CALL, RESULT]
    assert (ex.chosen, ex.rejected) == ([bot("42")], [bot("41")])


@pytest.mark.parametrize(
    ("prompt", "sys", "expected"),
    [
        ("q", "s", [system(), U]),
        ([U], "s", [system(), U]),
        ([system("own"), U], "s", [system("own"), U]),  # the prompt's own system message wins
        ("q", "", [U]),  # "" means no system prompt, as in many exports
        ("q", " ", [U]),
        ("q", None, [U]),
    ],
)
def test_system_is_prepended_when_the_prompt_has_none(prompt, sys, expected):
    assert norm({"prompt": prompt, "system": sys, "chosen": "a", "rejected": "b"}).prompt == expected


@pytest.mark.parametrize("conversation", [[U, A], [system(), U, A]])
def test_a_conversation_may_repeat_the_prompt_with_or_without_the_system_field(conversation):
    ex = norm({"prompt": "q", "system": "s", "chosen": conversation, "rejected": [U, B]})
    assert (ex.prompt, ex.chosen, ex.rejected) == ([system(), U], [A], [B])


def test_without_prompt_the_conversations_supply_it():
    prompt = [system(), U, A, user("and?")]
    ex = norm({"chosen": [*prompt, bot("c")], "rejected": [*prompt, bot("d")]})
    assert (ex.prompt, ex.chosen, ex.rejected) == (prompt, [bot("c")], [bot("d")])


def test_without_prompt_the_final_assistant_turn_is_the_response():
    ex = norm({"chosen": [U, CALL, RESULT, A], "rejected": [U, CALL, RESULT, B]})
    assert (ex.prompt, ex.chosen, ex.rejected) == ([U, CALL, RESULT], [A], [B])


@pytest.mark.parametrize(("chosen", "rejected"), [([U, A], "b"), ("a", [U, B]), ([U, A], [B]), (A, [U, B])])
def test_without_prompt_one_conversation_is_enough(chosen, rejected):
    ex = norm({"chosen": chosen, "rejected": rejected, "system": "s"})
    assert (ex.prompt, ex.chosen, ex.rejected) == ([system(), U], [A], [B])


@pytest.mark.parametrize(
    ("extra", "scores"),
    [
        ({}, (None, None)),
        ({"score": {"chosen": 8, "rejected": 2.5}}, (8.0, 2.5)),
        ({"score_chosen": 9.0, "score_rejected": 1}, (9.0, 1.0)),  # UltraFeedback's flat keys
        ({"score_chosen": -1, "score_rejected": 0}, (-1.0, 0.0)),
        ({"score": None, "score_chosen": None, "score_rejected": None}, (None, None)),
    ],
)
def test_scores(extra, scores):
    ex = norm({"prompt": "q", "chosen": "a", "rejected": "b", **extra})
    assert (ex.score_chosen, ex.score_rejected) == scores
    assert all(s is None or type(s) is float for s in scores)


def test_reject_reason_is_kept():
    ex = norm({"prompt": "q", "chosen": "a", "rejected": "b", "reject_reason": "factually wrong"})
    assert ex.reject_reason == "factually wrong"
    assert norm({"prompt": "q", "chosen": "a", "rejected": "b", "reject_reason": None}).reject_reason is None


# --- preference: issues -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        # the prompt
        ({"chosen": "a", "rejected": "b"}, [("prompt", "missing field", NO_PROMPT)]),
        ({"prompt": None, "chosen": [A], "rejected": [B]}, [("prompt", "missing field", NO_PROMPT)]),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, [("prompt", "wrong type", "expected string or list of messages, got int")]),
        ({"prompt": U, "chosen": "a", "rejected": "b"}, [("prompt", "wrong type", "expected string or list of messages, got object")]),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, [("prompt", "empty message", "")]),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, [("prompt", "no user turn", "the prompt is an empty list")]),
        ({"prompt": [system()], "chosen": "a", "rejected": "b"}, [("prompt", "no user turn", "")]),
        (
            {"prompt": [U, A], "chosen": "a", "rejected": "b"},
            [("prompt[1]", "prompt ends with an assistant turn", "it must end with a user or tool turn")],
        ),
        ({"prompt": [U, system(), U], "chosen": "a", "rejected": "b"}, [("prompt[1].role", "system message not first", "")]),
        (
            {"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
            [("prompt[0].role", "unknown role", "'bot' is not one of: system, user, assistant, tool")],
        ),
        ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, [("prompt[0]", "wrong type", "expected object, got string")]),
        ({"prompt": [user("")], "chosen": "a", "rejected": "b"}, [("prompt[0].content", "empty message", "")]),
        ({"prompt": "q", "system": 1, "chosen": "a", "rejected": "b"}, [("system", "wrong type", "expected string, got int")]),
        # the responses
        ({"prompt": "q", "rejected": "b"}, [("chosen", "missing field", "")]),
        ({"prompt": "q", "chosen": "a", "rejected": None}, [("rejected", "missing field", "")]),
        (
            {"prompt": "q", "chosen": 1, "rejected": "b"},
            [("chosen", "wrong type", "expected string, message object or list of messages, got int")],
        ),
        ({"prompt": "q", "chosen": "a", "rejected": " \n"}, [("rejected", "empty response", "")]),
        ({"prompt": "q", "chosen": bot(""), "rejected": "b"}, [("chosen.content", "empty response", "")]),
        ({"prompt": "q", "chosen": [CALL, RESULT, bot("")], "rejected": "b"}, [("chosen[2].content", "empty response", "")]),
        ({"prompt": "q", "chosen": [], "rejected": "b"}, [("chosen", "empty response", "the list holds no messages")]),
        ({"prompt": "q", "chosen": {"role": "assistant"}, "rejected": "b"}, [("chosen.content", "missing field", "")]),
        (
            {"prompt": "q", "chosen": "a", "rejected": user("b")},
            [("rejected", "does not end with an assistant turn", "the message is a 'user' turn")],
        ),
        (
            {"prompt": "q", "chosen": [A, user("more?")], "rejected": "b"},
            [("chosen[1]", "does not end with an assistant turn", "the last turn is 'user'")],
        ),
        (
            {"prompt": "q", "chosen": [CALL, RESULT], "rejected": "b"},
            [("chosen[1]", "does not end with an assistant turn", "the last turn is 'tool'")],
        ),
        (
            {"prompt": "q", "chosen": {"role": "robot", "content": "a"}, "rejected": "b"},
            [("chosen.role", "unknown role", "'robot' is not one of: system, user, assistant, tool")],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "gpt", "content": "b"}]},
            [("rejected[0].role", "unknown role", "'gpt' is not one of: system, user, assistant, tool")],
        ),
        (
            {"prompt": "q", "chosen": [A, {"role": "assistant", "content": "", "tool_calls": "f()"}], "rejected": "b"},
            [("chosen[1].tool_calls", "wrong type", "expected list, got string")],
        ),
        ({"prompt": "q", "chosen": [A, system(), A], "rejected": "b"}, [("chosen[1].role", "system message not first", "")]),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, [("rejected", "identical chosen and rejected", "")]),
        # a conversation that does not repeat the given prompt
        (
            {"prompt": "q", "chosen": "a", "rejected": [user("other"), B]},
            [("rejected", "prompt differs", "the conversation first differs from the prompt at message 0")],
        ),
        (
            {"prompt": [U, A, user("2")], "chosen": [U, A, user("3"), A], "rejected": "b"},
            [("chosen", "prompt differs", "the conversation first differs from the prompt at message 2")],
        ),
        (
            {"prompt": "q", "chosen": [U, user("more"), A], "rejected": "b"},
            [("chosen", "prompt differs", "the conversation first differs from the prompt at message 1")],
        ),
        (
            {"prompt": "q", "system": "s", "chosen": [system("t"), U, A], "rejected": "b"},
            [("chosen", "prompt differs", "the conversation first differs from the prompt at message 0")],
        ),
        # without a prompt, the conversations' prompts must agree
        (
            {"chosen": [U, A], "rejected": [user("other"), B]},
            [("rejected", "prompt differs", "its prompt first differs from the 'chosen' conversation's at message 0")],
        ),
        (
            {"chosen": [U, A, user("2"), A], "rejected": [U, B]},
            [("rejected", "prompt differs", "its prompt first differs from the 'chosen' conversation's at message 1")],
        ),
        (
            {"chosen": [system(), A], "rejected": [system(), B]},
            [("chosen", "no user turn", "nothing before its last assistant turn is a user turn")],
        ),
        (
            {"chosen": [U, A, A], "rejected": [U, A, B]},
            [("chosen[1]", "prompt ends with an assistant turn", "it must end with a user or tool turn")],
        ),
        # scores
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": 3},
            [("score", "wrong type", 'expected {"chosen": number, "rejected": number}, got int')],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": {"chosen": 1}},
            [("score.rejected", "missing field", "scores come in pairs: give both or neither")],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": {"chosen": True, "rejected": "2"}},
            [
                ("score.chosen", "wrong type", "expected number, got bool"),
                ("score.rejected", "wrong type", "expected number, got string"),
            ],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": {"chosen": math.nan, "rejected": 1}},
            [("score.chosen", "wrong type", "expected a finite number, got nan")],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score_rejected": 2},
            [("score_chosen", "missing field", "scores come in pairs: give both or neither")],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": False},
            [("score_rejected", "wrong type", "expected number, got bool")],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": {"chosen": 1, "rejected": 0}, "score_chosen": 1},
            [("score", "conflicting fields", "give either 'score' or 'score_chosen' and 'score_rejected'")],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "reject_reason": ["long"]},
            [("reject_reason", "wrong type", "expected string, got list")],
        ),
    ],
)
def test_preference_issues(row, expected):
    assert issues(row) == expected


@pytest.mark.parametrize(
    "same_as_a",
    [
        "a",
        bot("a"),
        [bot("a")],
        {"role": "assistant", "content": [{"type": "text", "text": "a"}], "weight": 2},
        [U, bot("a")],
    ],
)
def test_identical_is_judged_after_normalisation(same_as_a):
    assert reasons({"prompt": "q", "chosen": "a", "rejected": same_as_a}) == [
        ("rejected", "identical chosen and rejected")
    ]


def test_a_broken_conversation_does_not_also_report_the_prompt_missing():
    # It may well hold the prompt; once fixed, a real difference would still be reported.
    assert reasons({"chosen": [{"role": "bot", "content": "q"}, A], "rejected": "b"}) == [
        ("chosen[0].role", "unknown role")
    ]
    assert reasons({"chosen": [U], "rejected": [U, B]}) == [("chosen[0]", "does not end with an assistant turn")]


def test_a_broken_prompt_does_not_also_report_the_conversations_differ():
    row = {"prompt": [{"role": "bot", "content": "q"}], "chosen": [user("other"), A], "rejected": "b"}
    assert reasons(row) == [("prompt[0].role", "unknown role")]


def test_feedback_data_given_as_preference_says_so():
    assert issues({"prompt": "q", "completion": "a", "label": True}) == [
        ("chosen", "missing field", PREFERENCE_HINT),
        ("rejected", "missing field", PREFERENCE_HINT),
    ]


def test_every_issue_in_a_preference_row_is_reported():
    row = {
        "system": 1,
        "prompt": [U, system()],
        "chosen": [A, user("x")],
        "rejected": 5,
        "score_chosen": "9",
        "score_rejected": 1,
        "reject_reason": 0,
    }
    assert reasons(row) == [
        ("system", "wrong type"),
        ("prompt[1].role", "system message not first"),
        ("chosen[1]", "does not end with an assistant turn"),
        ("rejected", "wrong type"),
        ("score_chosen", "wrong type"),
        ("reject_reason", "wrong type"),
    ]


# --- feedback -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "desirable"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("up", True),
        ("DOWN", False),
        ("True", True),
        ("false", False),
        (" good ", True),
        ("Bad", False),
        ("desirable", True),
        ("UNDESIRABLE", False),
    ],
)
def test_feedback_labels(label, desirable):
    assert norm({"prompt": "q", "completion": "a", "label": label}, "feedback") == FeedbackExample(
        F, 7, prompt=[U], completion=[A], desirable=desirable
    )


@pytest.mark.parametrize(
    ("row", "prompt", "completion"),
    [
        ({"prompt": "q", "system": "s", "completion": A}, [system(), U], [A]),
        ({"prompt": [U], "completion": [CALL, RESULT, A]}, [U], [CALL, RESULT, A]),
        ({"prompt": "q", "completion": [U, A]}, [U], [A]),
        ({"completion": [U, CALL, RESULT, A]}, [U, CALL, RESULT], [A]),  # the prompt from the conversation
    ],
)
def test_feedback_prompt_and_completion_forms(row, prompt, completion):
    ex = norm({**row, "label": "up"}, "feedback")
    assert (ex.prompt, ex.completion, ex.desirable) == (prompt, completion, True)


@pytest.mark.parametrize("label", [2, -1, 0.5, "yes", "", "thumbs up", [True], {"value": 1}])
def test_bad_feedback_labels(label):
    shown = {list: "list", dict: "object"}.get(type(label)) or json.dumps(label)
    assert issues({"prompt": "q", "completion": "a", "label": label}, "feedback") == [
        ("label", "bad label", f"expected {ACCEPTED}; got {shown}")
    ]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "q", "completion": "a"}, [("label", "missing field", "")]),
        ({"prompt": "q", "completion": "a", "label": None}, [("label", "missing field", "")]),
        ({"prompt": "q", "label": 1}, [("completion", "missing field", "")]),
        (
            {"completion": "a", "label": 1},
            [("prompt", "missing field", "give 'prompt', or write 'completion' as the whole conversation, prompt first")],
        ),
        ({"prompt": "q", "completion": "", "label": 1}, [("completion", "empty response", "")]),
        (
            {"prompt": "q", "completion": [user("x"), A], "label": 1},
            [("completion", "prompt differs", "the conversation first differs from the prompt at message 0")],
        ),
        (
            {"prompt": [system()], "completion": [A, U], "label": "meh"},
            [
                ("prompt", "no user turn", ""),
                ("completion[1]", "does not end with an assistant turn", "the last turn is 'user'"),
                ("label", "bad label", f'expected {ACCEPTED}; got "meh"'),
            ],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            [("completion", "missing field", FEEDBACK_HINT), ("label", "missing field", FEEDBACK_HINT)],
        ),
        ({"prompt": "q", "chosen": "a", "label": 1}, [("completion", "missing field", FEEDBACK_HINT)]),
    ],
)
def test_feedback_issues(row, expected):
    assert issues(row, "feedback") == expected


def test_feedback_ignores_preference_only_fields_it_does_not_need():
    ex = norm({"prompt": "q", "completion": "a", "label": 0, "chosen": "x"}, "feedback")
    assert ex == FeedbackExample(F, 7, [U], [A], False)


# --- dispatch, config and loading -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["preference", "feedback"])
def test_a_row_that_is_not_an_object(fmt):
    assert issues(["q", "a"], fmt) == [("", "row is not an object", "got list")]


def test_unknown_format_lists_the_new_formats():
    with pytest.raises(PosttrainError, match=r"text, alpaca, messages, preference, feedback"):
        norm({}, "pairs")


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_load_preference_file_with_good_and_bad_rows(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    p = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            good,  # 1
            {"chosen": [U, A], "rejected": [U, B], "score_chosen": 8, "score_rejected": 3},  # 2 implicit prompt
            '{"prompt": "q", "chosen": ',  # 3 malformed JSON
            {"prompt": "q", "chosen": "a", "rejected": "a"},  # 4 identical
            "",  # 5 blank, skipped
            {"prompt": "q", "chosen": "a"},  # 6 rejected missing
            {"chosen": [U, A], "rejected": [user("x"), B]},  # 7 prompts differ
            {"prompt": "q", "chosen": " ", "rejected": "b"},  # 8 empty response
            {"chosen": "a", "rejected": "b"},  # 9 prompt missing
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": {"chosen": 1}},  # 10 score.rejected missing
            {"prompt": "q", "chosen": "a", "rejected": "a", "score": "high"},  # 11 identical + score wrong type
            {"prompt": [U, {"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},  # 12 unknown role
            ["not", "an", "object"],  # 13
            {"prompt": "q", "chosen": "c", "rejected": "d", "reject_reason": "rude"},  # 14
        ],
    )
    examples, report = load_examples(p, "preference")
    f = str(p)
    assert all(isinstance(e, PreferenceExample) and e.file == f for e in examples)
    assert [(e.row, e.prompt, e.chosen, e.rejected) for e in examples] == [
        (1, [U], [A], [B]),
        (2, [U], [A], [B]),
        (14, [U], [bot("c")], [bot("d")]),
    ]
    assert (examples[1].score_chosen, examples[1].score_rejected) == (8.0, 3.0)
    assert examples[2].reject_reason == "rude"
    assert report.rows_read == {f: 13}
    assert report.rows_kept == {f: 3}
    assert report.dropped == {
        "malformed JSON": 1,
        "identical chosen and rejected": 2,
        "missing field": 3,
        "prompt differs": 1,
        "empty response": 1,
        "unknown role": 1,
        "row is not an object": 1,
    }
    rows = {reason: [(i.file, i.row, i.field) for i in got] for reason, got in report.examples.items()}
    assert rows == {
        "malformed JSON": [(f, 3, "")],
        "identical chosen and rejected": [(f, 4, "rejected"), (f, 11, "rejected")],
        "missing field": [(f, 6, "rejected"), (f, 9, "prompt"), (f, 10, "score.rejected")],
        "prompt differs": [(f, 7, "rejected")],
        "empty response": [(f, 8, "chosen")],
        "unknown role": [(f, 12, "prompt[1].role")],
        "row is not an object": [(f, 13, "")],
    }
    # Row 11 is counted once, under its first issue, and still shows the other.
    assert report.examples["identical chosen and rejected"][1].detail == (
        'also score: wrong type (expected {"chosen": number, "rejected": number}, got string)'
    )
    assert f"{f}:7 field 'rejected': prompt differs (its prompt first differs" in report.format()


def test_load_feedback_file(tmp_path):
    p = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "q", "completion": "a", "label": "up"},
            {"prompt": "q", "completion": "b", "label": 0},
            {"prompt": "q", "completion": "c", "label": "maybe"},
            {"prompt": "q", "chosen": "a", "rejected": "b"},
        ],
    )
    examples, report = load_examples(p, "feedback")
    assert [(e.row, e.completion, e.desirable) for e in examples] == [(1, [A], True), (2, [B], False)]
    assert all(isinstance(e, FeedbackExample) for e in examples)
    assert report.dropped == {"bad label": 1, "missing field": 1}
    [missing] = report.examples["missing field"]
    assert (missing.row, missing.field) == (4, "completion")
    assert FEEDBACK_HINT in missing.detail and "label: missing field" in missing.detail
