"""Row schemas for preference data (pairs) and feedback data (unpaired, labelled).

Formats:
- ``preference``: {"prompt", "chosen", "rejected", "system"?, "score"?: {"chosen", "rejected"},
  "score_chosen"?, "score_rejected"?, "reject_reason"?}; the flat score keys are how
  UltraFeedback exports carry scores.
- ``feedback`` (KTO): {"prompt", "completion", "label", "system"?}; ``label`` is true/false,
  1/0, or "up"/"down", "true"/"false", "good"/"bad", "desirable"/"undesirable" in any case.
- ``prompt`` (online methods): {"prompt", "system"?, "reference"? or "answer"?, ...}; the
  reference answer (a string or number) and every other key (metadata) go to the rewards.

``prompt`` is a string (one user turn) or a list of OpenAI-style messages; ``system`` is
prepended when the prompt has no system message of its own. A response (``chosen``,
``rejected``, ``completion``) is a string (one assistant turn), one assistant message, or a
list of messages: the response alone (it starts with an assistant turn) or the whole
conversation, prompt first. Without ``prompt``, whole conversations supply it: each one's
prompt is everything before its final assistant turn, and all of them must agree.

Messages are read by ``formats.parse_message``, so roles, tool calls and text-part lists
behave as in the ``messages`` format. Like ``formats.normalise``, these collect every issue
in a row and never raise for one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from posttrain.data.formats import (
    Issues,
    check_not_empty,
    json_type,
    parse_message,
    parse_string,
)
from posttrain.data.report import RowIssue

_RESPONSE_FORMS = "string, message object or list of messages"
_LABELS = {
    # "1"/"0" as text: CSV files have no numbers.
    **dict.fromkeys(("true", "up", "good", "desirable", "1"), True),
    **dict.fromkeys(("false", "down", "bad", "undesirable", "0"), False),
}
_ACCEPTED_LABELS = (
    "true/false, 1/0, or one of 'up'/'down', 'true'/'false', 'good'/'bad', 'desirable'/'undesirable' (any case)"
)


@dataclass
class PreferenceExample:
    """A prompt with a chosen and a rejected response; where it came from travels with it."""

    file: str
    row: int
    prompt: list[dict]  # the conversation before the responses (ends with a user or tool turn)
    chosen: list[dict]  # the chosen response's messages (one assistant turn, or turns ending with one)
    rejected: list[dict]
    score_chosen: float | None = None
    score_rejected: float | None = None
    reject_reason: str | None = None


@dataclass
class FeedbackExample:
    """A prompt with one response labelled desirable or not (KTO)."""

    file: str
    row: int
    prompt: list[dict]
    completion: list[dict]
    desirable: bool


@dataclass
class PromptExample:
    """A prompt for sampling, with what the rewards may need to score a response."""

    file: str
    row: int
    prompt: list[dict]
    reference: str | None = None
    metadata: dict | None = None


PROMPT_KEYS = ("prompt", "system", "reference", "answer")


def normalise_prompt(row: dict, *, file: str, row_no: int) -> PromptExample | list[RowIssue]:
    """Return the row as a PromptExample, or every issue found in it (at least one)."""
    issues = Issues(file, row_no)
    system = parse_string(issues, row.get("system"), "system", required=False)
    given = row.get("prompt")
    prompt = None
    if given is None:
        issues.add("prompt", "missing field")
    else:
        prompt = _read_prompt(given, issues)
    key = "reference" if row.get("reference") is not None else "answer"
    reference = row.get(key)
    if isinstance(reference, bool) or not (reference is None or isinstance(reference, (str, int, float))):
        issues.add(key, "wrong type", f"expected string or number, got {json_type(reference)}")
    if issues.found:
        return issues.found
    metadata = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    return PromptExample(file, row_no, _with_system(prompt, system),
                         None if reference is None else str(reference), metadata)


def normalise_preference(row: dict, *, file: str, row_no: int) -> PreferenceExample | list[RowIssue]:
    """Return the row as a PreferenceExample, or every issue found in it (at least one)."""
    issues = Issues(file, row_no)
    hint = "this row has 'completion': it looks like feedback data (format: feedback)" if "completion" in row else ""
    prompt, (chosen, rejected) = _prompt_and_responses(row, ("chosen", "rejected"), issues, hint)
    if chosen is not None and chosen == rejected:
        issues.add("rejected", "identical chosen and rejected")
    score_chosen, score_rejected = _scores(row, issues)
    reject_reason = parse_string(issues, row.get("reject_reason"), "reject_reason", required=False)
    if issues.found:
        return issues.found
    return PreferenceExample(file, row_no, prompt, chosen, rejected, score_chosen, score_rejected, reject_reason)


def normalise_feedback(row: dict, *, file: str, row_no: int) -> FeedbackExample | list[RowIssue]:
    """Return the row as a FeedbackExample, or every issue found in it (at least one)."""
    issues = Issues(file, row_no)
    paired = "chosen" in row or "rejected" in row
    hint = "this row has 'chosen'/'rejected': it looks like preference data (format: preference)" if paired else ""
    prompt, (completion,) = _prompt_and_responses(row, ("completion",), issues, hint)
    desirable = _label(row.get("label"), issues, hint)
    if issues.found:
        return issues.found
    return FeedbackExample(file, row_no, prompt, completion, desirable)


@dataclass
class _Response:
    where: str
    messages: list[dict] | None  # as written in the row; None when unusable (the issue is recorded)
    conversation: bool  # opens with a non-assistant (or unreadable) turn, so it should repeat the prompt first


def _prompt_and_responses(
    row: dict, keys: tuple[str, ...], issues: Issues, missing_hint: str
) -> tuple[list[dict] | None, list[list[dict] | None]]:
    """The prompt (system message included) and each response's own messages; None where unusable."""
    system = parse_string(issues, row.get("system"), "system", required=False)
    given = row.get("prompt")
    prompt = _read_prompt(given, issues) if given is not None else None
    responses = [_read_response(row.get(key), key, issues, missing_hint) for key in keys]
    if given is None:
        prompt, replies = _implicit_prompt(responses, issues, keys)
    elif prompt is None:
        # An unreadable prompt cannot be compared with a conversation; its own issues say what to fix.
        replies = [r.messages if r and not r.conversation else None for r in responses]
    else:
        # A conversation may repeat the prompt with or without the system message from ``system``.
        variants = [_with_system(prompt, system), prompt]
        replies = [_after_prompt(r, variants, issues) if r else None for r in responses]
    return (_with_system(prompt, system) if prompt is not None else None), replies


def _with_system(prompt: list[dict], system: str | None) -> list[dict]:
    # Many datasets carry "system": "" to mean "no system prompt", so an empty one is ignored.
    if not (system and system.strip()) or prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _read_prompt(value: object, issues: Issues) -> list[dict] | None:
    if isinstance(value, str):
        check_not_empty(issues, "user", value, "prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        issues.add("prompt", "wrong type", f"expected string or list of messages, got {json_type(value)}")
        return None
    if not value:
        issues.add("prompt", "no user turn", "the prompt is an empty list")
        return None
    messages = [parse_message(m, f"prompt[{i}]", issues) for i, m in enumerate(value)]
    if any(m is None for m in messages):
        return None
    _check_order(messages, "prompt", issues)
    _check_prompt(messages, "prompt", issues, "")
    return messages


def _check_order(messages: list[dict], where: str, issues: Issues) -> None:
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            issues.add(f"{where}[{i}].role", "system message not first")


def _check_prompt(prompt: list[dict], where: str, issues: Issues, detail: str) -> None:
    roles = [m["role"] for m in prompt]
    if "user" not in roles:
        issues.add(where, "no user turn", detail)
    if roles[-1] == "assistant":
        # The responses are the model's next turn, so the prompt has to hand the turn over.
        issues.add(f"{where}[{len(roles) - 1}]", "prompt ends with an assistant turn", "it must end with a user or tool turn")


def _read_response(value: object, where: str, issues: Issues, missing_hint: str) -> _Response | None:
    if value is None:
        issues.add(where, "missing field", missing_hint)
        return None
    if isinstance(value, str):
        check_not_empty(issues, "assistant", value, where)
        return _Response(where, [{"role": "assistant", "content": value}], conversation=False)
    if isinstance(value, dict):
        message = parse_message(value, where, issues)
        if message is None:
            return None
        if message["role"] != "assistant":
            issues.add(where, "does not end with an assistant turn", f"the message is a {message['role']!r} turn")
            return None
        return _Response(where, [message], conversation=False)
    if not isinstance(value, list):
        issues.add(where, "wrong type", f"expected {_RESPONSE_FORMS}, got {json_type(value)}")
        return None
    if not value:
        issues.add(where, "empty response", "the list holds no messages")
        return None
    messages = [parse_message(m, f"{where}[{i}]", issues) for i, m in enumerate(value)]
    # A list whose first turn cannot be read may still be a conversation; treating it as one keeps
    # a derived prompt from also being reported missing.
    conversation = messages[0] is None or messages[0]["role"] != "assistant"
    if any(m is None for m in messages):
        return _Response(where, None, conversation)
    _check_order(messages, where, issues)
    last = messages[-1]["role"]
    if last != "assistant":
        issues.add(f"{where}[{len(messages) - 1}]", "does not end with an assistant turn", f"the last turn is {last!r}")
        return _Response(where, None, conversation)
    return _Response(where, messages, conversation)


def _after_prompt(response: _Response, variants: list[list[dict]], issues: Issues) -> list[dict] | None:
    """The response's own messages: a conversation must start with the prompt, then an assistant turn."""
    messages = response.messages
    if messages is None:
        return None
    for prompt in variants:
        n = len(prompt)
        if messages[:n] == prompt and len(messages) > n and messages[n]["role"] == "assistant":
            return messages[n:]
    if not response.conversation:
        return messages
    at = max(_common_prefix(messages, prompt) for prompt in variants)
    issues.add(response.where, "prompt differs", f"the conversation first differs from the prompt at message {at}")
    return None


def _implicit_prompt(
    responses: list[_Response | None], issues: Issues, keys: tuple[str, ...]
) -> tuple[list[dict] | None, list[list[dict] | None]]:
    """Without a ``prompt`` field, the prompt is what each conversation holds before its last turn."""
    if not any(r is not None and r.conversation for r in responses):
        names = " and ".join(repr(k) for k in keys)
        issues.add("prompt", "missing field", f"give 'prompt', or write {names} as the whole conversation, prompt first")
    prompt, source, replies = None, "", []
    for r in responses:
        if r is None or r.messages is None or not r.conversation:
            replies.append(r.messages if r else None)
            continue
        own = r.messages[:-1]
        if prompt is None:
            prompt, source = own, r.where
            _check_prompt(own, r.where, issues, "nothing before its last assistant turn is a user turn")
        elif own != prompt:
            at = _common_prefix(own, prompt)
            issues.add(r.where, "prompt differs", f"its prompt first differs from the {source!r} conversation's at message {at}")
            replies.append(None)
            continue
        replies.append(r.messages[-1:])
    return prompt, replies


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    """The index of the first message where a and b differ (the shorter length when one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _scores(row: dict, issues: Issues) -> tuple[float | None, float | None]:
    score = row.get("score")
    flat = {key: row.get(f"score_{key}") for key in ("chosen", "rejected")}
    if score is not None:
        if any(v is not None for v in flat.values()):
            issues.add("score", "conflicting fields", "give either 'score' or 'score_chosen' and 'score_rejected'")
            return None, None
        if not isinstance(score, dict):
            issues.add("score", "wrong type", f'expected {{"chosen": number, "rejected": number}}, got {json_type(score)}')
            return None, None
        return _number(score.get("chosen"), "score.chosen", issues), _number(score.get("rejected"), "score.rejected", issues)
    if all(v is None for v in flat.values()):
        return None, None
    return _number(flat["chosen"], "score_chosen", issues), _number(flat["rejected"], "score_rejected", issues)


def _number(value: object, where: str, issues: Issues) -> float | None:
    if value is None:
        issues.add(where, "missing field", "scores come in pairs: give both or neither")
        return None
    # bool is an int in Python, but true is not a score in JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        issues.add(where, "wrong type", f"expected number, got {json_type(value)}")
        return None
    if not math.isfinite(value):
        issues.add(where, "wrong type", f"expected a finite number, got {value}")
        return None
    return float(value)


def _label(value: object, issues: Issues, missing_hint: str) -> bool | None:
    if value is None:
        issues.add("label", "missing field", missing_hint)
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    shown = json.dumps(value) if isinstance(value, (str, int, float)) else json_type(value)
    issues.add("label", "bad label", f"expected {_ACCEPTED_LABELS}; got {shown}")
    return None
