"""normalise (row schemas) and load_examples (rows -> examples + report)."""

import json

import pytest

from posttrain.data.formats import DEFAULT_ROLE_MAP, Example, normalise
from posttrain.data.validate import load_examples
from posttrain.errors import DataError, PosttrainError

F = "data.jsonl"


def norm(row, fmt="messages", **kw):
    return normalise(row, fmt, file=F, row_no=7, **kw)


def issues(row, fmt="messages", **kw):
    """(field, reason, detail) of every issue, asserting the row was rejected."""
    result = norm(row, fmt, **kw)
    assert isinstance(result, list) and result, f"expected issues, got {result!r}"
    assert all(i.file == F and i.row == 7 for i in result)
    return [(i.field, i.reason, i.detail) for i in result]


def reasons(row, fmt="messages", **kw):
    return [(f, r) for f, r, _ in issues(row, fmt, **kw)]


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


# --- text -------------------------------------------------------------------------------------


def test_text_row():
    assert norm({"text": "  some text\n", "id": 3}, "text") == Example(F, 7, text="  some text\n")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({}, [("text", "missing field", "")]),
        ({"text": None}, [("text", "missing field", "")]),
        ({"text": 5}, [("text", "wrong type", "expected string, got int")]),
        ({"text": " \n"}, [("text", "empty text", "")]),
    ],
)
def test_text_issues(row, expected):
    assert issues(row, "text") == expected


def test_row_that_is_not_an_object():
    assert issues([1], "text") == [("", "row is not an object", "got list")]


# --- alpaca -----------------------------------------------------------------------------------


def test_alpaca_with_system_history_and_input():
    row = {
        "system": "Be terse.",
        "history": [["q1", "a1"], ["q2", "a2"]],
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
    }
    assert norm(row, "alpaca") == Example(
        F,
        7,
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "Translate\n\nbonjour"},
            {"role": "assistant", "content": "hello"},
        ],
    )


@pytest.mark.parametrize(
    "extra", [{}, {"input": ""}, {"input": None}, {"input": "  "}, {"system": ""}, {"system": None}, {"history": None}]
)
def test_alpaca_optional_fields_absent_or_empty(extra):
    row = {"instruction": "Say hi", "output": "hi", **extra}
    expected = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert norm(row, "alpaca").messages == expected


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"output": "x"}, [("instruction", "missing field", "")]),
        ({"instruction": "x"}, [("output", "missing field", "")]),
        ({"instruction": "x", "output": 3}, [("output", "wrong type", "expected string, got int")]),
        ({"instruction": "x", "output": " "}, [("output", "empty response", "")]),
        ({"instruction": "", "output": "y"}, [("instruction", "empty message", "")]),
        ({"instruction": "x", "input": ["a"], "output": "y"}, [("input", "wrong type", "expected string, got list")]),
        ({"instruction": "x", "system": {}, "output": "y"}, [("system", "wrong type", "expected string, got object")]),
        (
            {"instruction": "x", "output": "y", "history": "q"},
            [("history", "wrong type", "expected list of [user, assistant] pairs, got string")],
        ),
        (
            {"instruction": "x", "output": "y", "history": [["q", "a"], ["q", "a", "b"], "qa"]},
            [
                ("history[1]", "wrong type", "expected a [user, assistant] pair, got a list of 3 items"),
                ("history[2]", "wrong type", "expected a [user, assistant] pair, got string"),
            ],
        ),
        (
            {"instruction": "x", "output": "y", "history": [["", "a"], ["q", 1], ["q", ""], ["q", None]]},
            [
                ("history[0][0]", "empty message", ""),
                ("history[1][1]", "wrong type", "expected string, got int"),
                ("history[2][1]", "empty response", ""),
                ("history[3][1]", "missing field", ""),
            ],
        ),
    ],
)
def test_alpaca_issues(row, expected):
    assert issues(row, "alpaca") == expected


def test_alpaca_reports_every_issue_in_the_row():
    assert reasons({"instruction": 1, "output": ""}, "alpaca") == [
        ("instruction", "wrong type"),
        ("output", "empty response"),
    ]


# --- messages (OpenAI style) ------------------------------------------------------------------


def test_messages_with_text_parts_tools_and_extra_keys():
    row = {
        "messages": [
            {"role": "system", "content": "sys", "weight": 0},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}], "name": None},
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "calc"},
            {"role": "assistant", "content": "It is 42."},
        ]
    }
    assert norm(row).messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "calc"},
        {"role": "assistant", "content": "It is 42."},
    ]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({}, [("messages", "missing field", "expected 'messages' (OpenAI style) or 'conversations' (ShareGPT)")]),
        ({"messages": "hi"}, [("messages", "wrong type", "expected list, got string")]),
        ({"messages": []}, [("messages", "empty conversation", "")]),
        ({"messages": [U, "x"]}, [("messages[1]", "wrong type", "expected object, got string")]),
        ({"messages": [U, {"content": "x"}]}, [("messages[1].role", "missing field", "")]),
        (
            {"messages": [U, {"role": 1, "content": "x"}]},
            [("messages[1].role", "wrong type", "expected string, got int")],
        ),
        (
            {"messages": [U, {"role": "bot", "content": "x"}]},
            [("messages[1].role", "unknown role", "'bot' is not one of: system, user, assistant, tool")],
        ),
        ({"messages": [U, {"role": "assistant"}]}, [("messages[1].content", "missing field", "")]),
        (
            {"messages": [U, {"role": "assistant", "content": 1}]},
            [("messages[1].content", "wrong type", "expected string or list of text parts, got int")],
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}, A]},
            [("messages[0].content[1]", "wrong type", "only text parts are supported, got a part of type 'image_url'")],
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}, A]},
            [
                (
                    "messages[0].content[0]",
                    "wrong type",
                    "only text parts are supported, got a text part whose text is int",
                )
            ],
        ),
        ({"messages": [U, {"role": "assistant", "content": " \n"}]}, [("messages[1].content", "empty response", "")]),
        ({"messages": [{"role": "user", "content": ""}, A]}, [("messages[0].content", "empty message", "")]),
        ({"messages": [{"role": "system", "content": ""}, U, A]}, [("messages[0].content", "empty message", "")]),
        (
            {"messages": [U, A, {"role": "tool", "content": "", "tool_call_id": "c"}, A]},
            [("messages[2].content", "empty message", "")],
        ),
        (
            {"messages": [U, A, U]},
            [("messages[2]", "does not end with an assistant turn", "the last turn is 'user'")],
        ),
        ({"messages": [{"role": "system", "content": "s"}, U]}, [("messages", "no assistant turn", "")]),
        (
            {"messages": [U, {"role": "system", "content": "s"}, A]},
            [("messages[1].role", "system message not first", "")],
        ),
        (
            {"messages": [U, {"role": "assistant", "content": "", "tool_calls": "f()"}]},
            [("messages[1].tool_calls", "wrong type", "expected list, got string")],
        ),
        (
            {"messages": [U, {"role": "tool", "content": "r", "tool_call_id": 5}, A]},
            [("messages[1].tool_call_id", "wrong type", "expected string, got int")],
        ),
    ],
)
def test_messages_issues(row, expected):
    assert issues(row) == expected


def test_tool_calls_do_not_excuse_empty_user_content():
    assert reasons({"messages": [{"role": "user", "content": "", "tool_calls": [{}]}, A]}) == [
        ("messages[0].content", "empty message")
    ]


def test_order_checks_are_skipped_when_a_role_is_unknown():
    # Ending on the unknown turn must not also be reported as "does not end with an assistant turn".
    assert reasons({"messages": [U, {"role": "bot", "content": "x"}]}) == [("messages[1].role", "unknown role")]


def test_every_issue_in_a_conversation_is_reported():
    system = {"role": "system", "content": "s"}
    row = {"messages": [{"role": "user", "content": ""}, system, {"role": "user", "content": 1}, A, U]}
    assert reasons(row) == [
        ("messages[0].content", "empty message"),
        ("messages[2].content", "wrong type"),
        ("messages[1].role", "system message not first"),
        ("messages[4]", "does not end with an assistant turn"),
    ]


# --- messages (ShareGPT) ----------------------------------------------------------------------


def test_sharegpt_with_default_role_map():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a", "weight": 1},
            {"from": "human", "value": "q2"},
            {"from": "function_call", "value": "x"},
        ]
    }
    assert issues(row) == [
        (
            "conversations[4].from",
            "unknown role",
            f"'function_call' is not one of: {', '.join(DEFAULT_ROLE_MAP)}",
        )
    ]
    row["conversations"][-1] = {"from": "chatgpt", "value": "a2"}
    assert norm(row).messages == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]


def test_sharegpt_custom_role_map_replaces_the_default():
    role_map = {"Q": "user", "A": "assistant"}
    row = {"conversations": [{"from": "Q", "value": "q"}, {"from": "A", "value": "a"}]}
    assert norm(row, role_map=role_map).messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    default_names = {"conversations": [{"from": "human", "value": "q"}, {"from": "A", "value": "a"}]}
    assert issues(default_names, role_map=role_map) == [
        ("conversations[0].from", "unknown role", "'human' is not one of: Q, A")
    ]


def test_sharegpt_field_paths_use_its_own_keys():
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}
    assert reasons(row) == [("conversations[1].value", "empty response")]
    assert reasons({"conversations": [{"from": "human", "value": "q"}]}) == [("conversations", "no assistant turn")]


def test_messages_key_wins_over_conversations():
    row = {"messages": [U, A], "conversations": [{"from": "bot", "value": "x"}]}
    assert norm(row).messages == [U, A]


# --- config mistakes raise ---------------------------------------------------------------------


def test_unknown_format_is_a_config_error():
    with pytest.raises(PosttrainError, match=r"unknown format 'chatml'.*text, alpaca, messages"):
        norm({"text": "x"}, "chatml")


def test_role_map_to_an_unknown_role_is_a_config_error():
    with pytest.raises(PosttrainError, match=r"'A' -> 'bot'"):
        norm({"conversations": []}, role_map={"Q": "user", "A": "bot"})


# --- load_examples and the report ---------------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_mixed_bad_file_gives_exact_report(tmp_path):
    good = {"messages": [U, A]}
    p = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            good,  # 1
            '{"messages": [',  # 2 malformed JSON
            {"messages": [{"role": "user", "content": 3}, A]},  # 3 wrong type
            "",  # 4 blank, skipped
            {"messages": [U, {"role": "assistant", "content": ""}]},  # 5 empty response
            {"messages": [U, A, U]},  # 6 ends on a user turn
            {"messages": [U, {"role": "robot", "content": "x"}]},  # 7 unknown role
            good,  # 8
            {"messages": [U, {"role": "robot", "content": "x"}]},  # 9 unknown role
            {"messages": [{"role": "user", "content": 1}, {"role": "bot", "content": "x"}]},  # 10 two issues
        ],
    )
    examples, report = load_examples(p, "messages")
    f = str(p)
    assert [e.row for e in examples] == [1, 8]
    assert all(e.file == f and e.messages == [U, A] for e in examples)
    assert report.rows_read == {f: 9}
    assert report.rows_kept == {f: 2}
    assert report.dropped == {
        "malformed JSON": 1,
        "wrong type": 2,
        "empty response": 1,
        "does not end with an assistant turn": 1,
        "unknown role": 2,
    }
    rows = {reason: [(i.row, i.field) for i in got] for reason, got in report.examples.items()}
    assert rows == {
        "malformed JSON": [(2, "")],
        "wrong type": [(3, "messages[0].content"), (10, "messages[0].content")],
        "empty response": [(5, "messages[1].content")],
        "does not end with an assistant turn": [(6, "messages[2]")],
        "unknown role": [(7, "messages[1].role"), (9, "messages[1].role")],
    }
    # The row with two issues is counted once, but its second issue is still shown.
    assert report.examples["wrong type"][1].detail == (
        "expected string or list of text parts, got int; "
        "also messages[1].role: unknown role ('bot' is not one of: system, user, assistant, tool)"
    )
    report.check(max_drop_fraction=0.9)
    with pytest.raises(DataError, match="dropped, more than"):
        report.check(max_drop_fraction=0.5)


def test_zero_usable_rows_is_a_data_error(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}, "nope"])
    examples, report = load_examples(p, "alpaca")
    assert examples == []
    assert report.dropped == {"empty response": 1, "malformed JSON": 1}
    with pytest.raises(DataError, match=r"no usable rows") as err:
        report.check(max_drop_fraction=1.0)
    assert f"{p}:1 field 'output': empty response" in str(err.value)


def test_empty_file_is_listed_and_unusable(tmp_path):
    p = write_jsonl(tmp_path / "empty.jsonl", [""])
    examples, report = load_examples(p, "text")
    assert examples == [] and report.rows_read == {str(p): 0}
    assert f"{p}: 0 of 0 kept" in report.format()
    with pytest.raises(DataError, match="no usable rows"):
        report.check(max_drop_fraction=1.0)


def test_reports_accumulate_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": ""}])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"text": "y"}, 3]), encoding="utf-8")
    ex_a, report = load_examples(a, "text")
    ex_b, same = load_examples(b, "text", report=report)
    assert same is report
    assert [(e.file, e.row, e.text) for e in ex_a + ex_b] == [(str(a), 1, "x"), (str(b), 1, "y")]
    assert report.rows_read == {str(a): 2, str(b): 2} and report.total_kept == 2
    assert report.dropped == {"empty text": 1, "row is not an object": 1}


def test_load_examples_checks_the_format_before_reading(tmp_path):
    with pytest.raises(PosttrainError, match="unknown format"):
        load_examples(tmp_path / "missing.jsonl", "sft")


def test_load_examples_csv_with_role_map(tmp_path):
    p = tmp_path / "chat.csv"
    conv = [{"from": "Q", "value": "q"}, {"from": "A", "value": "a"}]
    cell = '"' + json.dumps(conv).replace('"', '""') + '"'  # CSV quoting: inner quotes doubled
    p.write_text(f"id,conversations\n1,{cell}\n2,\n", encoding="utf-8")
    examples, report = load_examples(p, "messages", role_map={"Q": "user", "A": "assistant"})
    assert [(e.row, e.messages) for e in examples] == [
        (2, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    ]
    assert [(i.row, i.field, i.reason) for i in report.examples["missing field"]] == [(3, "messages", "missing field")]
