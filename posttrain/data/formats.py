"""Row schemas: turn one raw row of a supported format into an ``Example``.

Formats:
- ``text``: {"text": str}; for continued pretraining.
- ``alpaca``: {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}.
- ``messages``: {"messages": [{"role", "content"}, ...]} (OpenAI style), or ShareGPT's
  {"conversations": [{"from", "value"}, ...]} mapped through a role map.
- ``preference``: {"prompt", "chosen", "rejected", ...}, a prompt with a better and a worse
  response; and ``feedback``: {"prompt", "completion", "label"}, one response labelled
  desirable or not (KTO). Both live in ``preference.py``, built on this module's parsers.
- ``multitask``: {"task", "input", "output", "instruction"?}: one task's example (seed-style task
  collections); the user turn is the instruction and the input, the assistant turn the output.

Rows of ``text``, ``alpaca``, ``messages`` and ``multitask`` may name their ``task`` (a string or an
integer); per-task metrics and ``data.mixing`` group rows by it (docs/multitask.md).

``normalise`` collects every problem in a row instead of stopping at the first, so a
user fixing a file sees all of a row's faults in one pass. The ``reason`` of each
issue is one of a fixed set of short categories (the report groups by it); the
specifics go into ``detail``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from posttrain.config import TASK_NAME, TASK_NAME_RULE
from posttrain.data.report import RowIssue
from posttrain.errors import PosttrainError

if TYPE_CHECKING:
    from posttrain.data.preference import FeedbackExample, PreferenceExample

FORMATS = ("text", "alpaca", "messages", "preference", "feedback", "prompt", "multitask")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT exports name speakers after the tool that produced them; these are the common names.
DEFAULT_ROLE_MAP: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
}
# Chat templates need these for tool use; other keys are dropped so every template sees one schema.
PASSTHROUGH_KEYS = ("name", "tool_calls", "tool_call_id")
OPENAI_ROLES = {role: role for role in ROLES}


@dataclass
class Example:
    """A validated, normalised row; where it came from travels with it."""

    file: str
    row: int
    text: str | None = None  # format "text"
    messages: list[dict] | None = None  # [{"role": ..., "content": ...}], roles in ROLES
    task: str | None = None  # the row's task, when it names one


def json_type(value: object) -> str:
    """Name a value's type the way the user wrote it in the data file (JSON), not Python's name."""
    names = {type(None): "null", bool: "bool", str: "string", dict: "object", list: "list"}
    return names.get(type(value), type(value).__name__)


def check_config(fmt: str, role_map: dict[str, str] | None = None) -> None:
    """Raise for a bad format name or role map: these are config mistakes, not row problems."""
    if fmt not in FORMATS:
        raise PosttrainError(f"unknown format {fmt!r}; the data format must be one of: {', '.join(FORMATS)}")
    bad = [f"{k!r} -> {v!r}" for k, v in (role_map or {}).items() if v not in ROLES]
    if bad:
        raise PosttrainError(
            f"role map has unknown target roles ({', '.join(bad)}); map each name to one of: {', '.join(ROLES)}"
        )


def normalise(
    row: dict, fmt: str, *, file: str, row_no: int, role_map: dict[str, str] | None = None
) -> Example | PreferenceExample | FeedbackExample | list[RowIssue]:
    """Return the row as an example, or every issue found in it (at least one).

    The example is a ``PreferenceExample`` for format "preference", a ``FeedbackExample``
    for "feedback", and an ``Example`` otherwise. ``role_map`` (ShareGPT "from" -> role)
    replaces ``DEFAULT_ROLE_MAP`` when given; preference and feedback rows hold OpenAI-style
    messages only, so it does not apply to them.
    """
    check_config(fmt, role_map)
    issues = Issues(file, row_no)
    if not isinstance(row, dict):
        issues.add("", "row is not an object", f"got {json_type(row)}")
        return issues.found
    if fmt in ("preference", "feedback", "prompt"):
        # Imported here: preference.py builds on this module's parsers, so it imports this module.
        from posttrain.data.preference import normalise_feedback, normalise_preference, normalise_prompt

        schema = {"preference": normalise_preference, "feedback": normalise_feedback, "prompt": normalise_prompt}
        return schema[fmt](row, file=file, row_no=row_no)
    task = _task(row, issues, required=fmt == "multitask")
    if fmt == "text":
        example = Example(file, row_no, text=_text(row, issues), task=task)
    elif fmt == "alpaca":
        example = Example(file, row_no, messages=_alpaca(row, issues), task=task)
    elif fmt == "multitask":
        example = Example(file, row_no, messages=_multitask(row, issues), task=task)
    else:
        roles = DEFAULT_ROLE_MAP if role_map is None else role_map
        example = Example(file, row_no, messages=_conversation(row, issues, roles), task=task)
    return issues.found or example


@dataclass
class Issues:
    """Collects every issue of one row, each with the row's file and number."""

    file: str
    row: int
    found: list[RowIssue] = field(default_factory=list)

    def add(self, where: str, reason: str, detail: str = "") -> None:
        self.found.append(RowIssue(self.file, self.row, where, reason, detail))


def parse_string(issues: Issues, value: object, where: str, *, required: bool, expected: str = "string") -> str | None:
    """The value if it is a string; otherwise record why not and return None (null counts as missing)."""
    if value is None:
        if required:
            issues.add(where, "missing field")
        return None
    if not isinstance(value, str):
        issues.add(where, "wrong type", f"expected {expected}, got {json_type(value)}")
        return None
    return value


def check_not_empty(issues: Issues, role: str, content: str, where: str) -> None:
    """Record blank content: "empty response" for an assistant turn, "empty message" otherwise."""
    # An empty response teaches the model to say nothing, so it gets its own category.
    if not content.strip():
        issues.add(where, "empty response" if role == "assistant" else "empty message")


def _text(row: dict, issues: Issues) -> str | None:
    text = parse_string(issues, row.get("text"), "text", required=True)
    if text is not None and not text.strip():
        issues.add("text", "empty text")
    return text


def _task(row: dict, issues: Issues, *, required: bool) -> str | None:
    value = row.get("task")
    # Task collections often number their tasks; a number names the task as well as a string does.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    task = parse_string(issues, value, "task", required=required, expected="string or integer")
    if task is not None and not TASK_NAME.fullmatch(task):
        issues.add("task", "bad task name", f"{task!r}: a task name is {TASK_NAME_RULE}")
        return None
    return task


def _multitask(row: dict, issues: Issues) -> list[dict]:
    instruction = parse_string(issues, row.get("instruction"), "instruction", required=False)
    given = parse_string(issues, row.get("input"), "input", required=True)
    output = parse_string(issues, row.get("output"), "output", required=True)
    messages = []
    if given is not None:
        check_not_empty(issues, "user", given, "input")
        prompt = f"{instruction}\n\n{given}" if instruction and instruction.strip() else given
        messages.append({"role": "user", "content": prompt})
    if output is not None:
        check_not_empty(issues, "assistant", output, "output")
        messages.append({"role": "assistant", "content": output})
    return messages


def _alpaca(row: dict, issues: Issues) -> list[dict]:
    messages = []
    system = parse_string(issues, row.get("system"), "system", required=False)
    # Many alpaca datasets carry "system": "" to mean "no system prompt", so an empty one is not an issue.
    if system and system.strip():
        messages.append({"role": "system", "content": system})

    history = row.get("history")
    if history is not None and not isinstance(history, list):
        issues.add("history", "wrong type", f"expected list of [user, assistant] pairs, got {json_type(history)}")
    for i, pair in enumerate(history if isinstance(history, list) else []):
        if not (isinstance(pair, list) and len(pair) == 2):
            got = f"a list of {len(pair)} items" if isinstance(pair, list) else json_type(pair)
            issues.add(f"history[{i}]", "wrong type", f"expected a [user, assistant] pair, got {got}")
            continue
        for role, value, where in (("user", pair[0], f"history[{i}][0]"), ("assistant", pair[1], f"history[{i}][1]")):
            content = parse_string(issues, value, where, required=True)
            if content is not None:
                check_not_empty(issues, role, content, where)
                messages.append({"role": role, "content": content})

    instruction = parse_string(issues, row.get("instruction"), "instruction", required=True)
    extra_input = parse_string(issues, row.get("input"), "input", required=False)
    output = parse_string(issues, row.get("output"), "output", required=True)
    if instruction is not None:
        check_not_empty(issues, "user", instruction, "instruction")
        prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
        messages.append({"role": "user", "content": prompt})
    if output is not None:
        check_not_empty(issues, "assistant", output, "output")
        messages.append({"role": "assistant", "content": output})
    return messages


def _conversation(row: dict, issues: Issues, role_map: dict[str, str]) -> list[dict] | None:
    if row.get("messages") is not None:
        key, role_key, content_key, lookup = "messages", "role", "content", OPENAI_ROLES
    elif row.get("conversations") is not None:
        key, role_key, content_key, lookup = "conversations", "from", "value", role_map
    else:
        issues.add("messages", "missing field", "expected 'messages' (OpenAI style) or 'conversations' (ShareGPT)")
        return None
    turns = row[key]
    if not isinstance(turns, list):
        issues.add(key, "wrong type", f"expected list, got {json_type(turns)}")
        return None
    if not turns:
        issues.add(key, "empty conversation")
        return None

    messages = [
        parse_message(t, f"{key}[{i}]", issues, role_key=role_key, content_key=content_key, roles=lookup)
        for i, t in enumerate(turns)
    ]
    # Order checks on a conversation with unreadable roles would only repeat the role issues.
    if any(m is None for m in messages):
        return None
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            issues.add(f"{key}[{i}].{role_key}", "system message not first")
    if "assistant" not in roles:
        issues.add(key, "no assistant turn")
    elif roles[-1] != "assistant":
        issues.add(f"{key}[{len(roles) - 1}]", "does not end with an assistant turn", f"the last turn is {roles[-1]!r}")
    return messages


def parse_message(
    turn: object,
    where: str,
    issues: Issues,
    *,
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] = OPENAI_ROLES,
) -> dict | None:
    """One normalised message ({"role", "content", ...PASSTHROUGH_KEYS}), or None when its role cannot be known.

    ``where`` is the message's field path; ``roles`` maps the names the data uses to ``ROLES``.
    Problems with the content are recorded but still give a message, so checks on the
    conversation's shape can go on.
    """
    if not isinstance(turn, dict):
        issues.add(where, "wrong type", f"expected object, got {json_type(turn)}")
        return None
    given = parse_string(issues, turn.get(role_key), f"{where}.{role_key}", required=True)
    if given is None:
        return None
    role = roles.get(given)
    if role is None:
        issues.add(f"{where}.{role_key}", "unknown role", f"{given!r} is not one of: {', '.join(roles)}")
        return None

    extras = {k: turn[k] for k in PASSTHROUGH_KEYS if turn.get(k) is not None}
    for k in ("name", "tool_call_id"):
        parse_string(issues, extras.get(k), f"{where}.{k}", required=False)
    if "tool_calls" in extras and not isinstance(extras["tool_calls"], list):
        issues.add(f"{where}.tool_calls", "wrong type", f"expected list, got {json_type(extras['tool_calls'])}")
    # An assistant turn that only calls tools legitimately has no text.
    calls_tools = role == "assistant" and bool(extras.get("tool_calls"))
    content = _content(turn.get(content_key), f"{where}.{content_key}", issues, required=not calls_tools)
    if content is not None and not calls_tools:
        check_not_empty(issues, role, content, f"{where}.{content_key}")
    return {"role": role, "content": content or "", **extras}


def _content(value: object, where: str, issues: Issues, *, required: bool) -> str | None:
    """Content as one string; OpenAI-style lists of text parts are joined."""
    if not isinstance(value, list):
        return parse_string(issues, value, where, required=required, expected="string or list of text parts")
    texts = []
    for j, part in enumerate(value):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            issues.add(f"{where}[{j}]", "wrong type", f"only text parts are supported, got {_describe_part(part)}")
    return "".join(texts) if len(texts) == len(value) else None


def _describe_part(part: object) -> str:
    if not isinstance(part, dict):
        return json_type(part)
    if part.get("type") != "text":
        return f"a part of type {part.get('type')!r}"
    return f"a text part whose text is {json_type(part.get('text'))}"
