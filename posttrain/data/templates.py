"""Render conversations with the tokenizer's own chat template and derive label masks.

Any Jinja template works; nothing here is written per model family. The trained
span of an assistant turn is found from the template itself:

- the turn starts where ``render(messages[:i], add_generation_prompt=True)`` ends;
- it ends where ``render(messages[:i+1])`` ends, minus whatever the template writes
  after the turn's end-of-turn token (e.g. ChatML's trailing newline).

The end-of-turn token is the first special token the template writes after an
assistant message's content. Character spans become token labels through the
fast tokenizer's offset mapping, so the labels follow the exact tokens the model
sees. Templates whose renders of a prefix are not a prefix of the full render
(some drop earlier reasoning) cannot be masked this way and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError

IGNORE_INDEX = -100
_SENTINEL = "\u2063posttrain-sentinel\u2063"


class TemplateMismatch(Exception):
    """A conversation the template does not render prefix-consistently."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    spans: list[tuple[int, int]]  # trained token ranges [start, end), one per trained assistant turn

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def resolve_chat_template(tokenizer, override: str | None) -> None:
    """Install ``override`` (a template or a path to one) or check that the tokenizer has a template."""
    if override:
        tokenizer.chat_template = _read_if_file(override)
    if not getattr(tokenizer, "chat_template", None):
        raise PosttrainError(
            "the tokenizer has no chat template, so conversations cannot be rendered. "
            "Set model.chat_template to a Jinja template (or a file holding one), "
            "or use method: pretrain with format: text."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise PosttrainError("label masks need a fast tokenizer (with offset mappings); this one is a slow tokenizer")


def _read_if_file(override: str) -> str:
    """The file's text when ``override`` names a file, else ``override`` itself (an inline template)."""
    try:
        is_file = Path(override).is_file()
    except (OSError, ValueError):  # an inline template is often too long to be a file name (ENAMETOOLONG)
        is_file = False
    return Path(override).read_text(encoding="utf-8") if is_file else override


def _special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    for tok in tokenizer.added_tokens_decoder.values():
        if tok.special:
            specials.add(tok.content)
    return sorted(specials, key=len, reverse=True)


class ChatEncoder:
    """Encodes conversations and raw text into input ids and labels for one tokenizer."""

    def __init__(self, tokenizer, train_on: str = "all_assistant"):
        self.tok = tokenizer
        self.train_on = train_on
        self.end_of_turn = self._find_end_of_turn() if getattr(tokenizer, "chat_template", None) else None

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _find_end_of_turn(self) -> str | None:
        text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}])
        after = text[text.index(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in text else ""
        hits = [(after.find(s), s) for s in _special_strings(self.tok) if s and s in after]
        # The earliest one; where several start at the same place, the longest.
        return min(hits, key=lambda h: (h[0], -len(h[1])))[1] if hits else None

    @property
    def end_of_turn_id(self) -> int | None:
        return self.tok.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None

    def trained_char_spans(self, messages: list[dict], train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """The full render and the character spans to train (one per selected assistant turn).

        Assistant turns before message ``train_from`` are context, not trained (a preference
        pair's prompt may hold earlier assistant turns).
        """
        full = self._render(messages)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant" or i < train_from:
                continue
            head = self._render(messages[:i], add_generation_prompt=True)
            turn = self._render(messages[: i + 1])
            if not full.startswith(head) or not full.startswith(turn) or not turn.startswith(head):
                raise TemplateMismatch(
                    f"the chat template renders turn {i} differently inside the whole conversation"
                )
            end = len(turn)
            tail = turn[len(head) :]
            if self.end_of_turn and self.end_of_turn in tail:
                end = len(head) + tail.rindex(self.end_of_turn) + len(self.end_of_turn)
            else:
                end = len(head) + len(tail.rstrip())
            spans.append((len(head), end))
        if self.train_on == "last_assistant":
            spans = spans[-1:]
        return full, spans

    def encode_messages(self, messages: list[dict], train_from: int = 0) -> Encoded:
        text, char_spans = self.trained_char_spans(messages, train_from)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        firsts: dict[int, int] = {}
        lasts: dict[int, int] = {}
        k = 0
        for t, (s, e) in enumerate(offsets):
            while k < len(char_spans) and s >= char_spans[k][1]:
                k += 1
            if k == len(char_spans):
                break
            # A token is trained when it overlaps the turn. With templates such as
            # "assistant: " + answer, the answer's first token carries the template's space;
            # leaving it out would never teach the model how a response begins.
            if e > s and e > char_spans[k][0]:
                labels[t] = ids[t]
                firsts.setdefault(k, t)
                lasts[k] = t
        tok_spans = [(firsts[k], lasts[k] + 1) for k in sorted(firsts)]
        return Encoded(ids, labels, tok_spans)

    def encode_text(self, text: str) -> Encoded:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        if bos is not None and self.tok("a")["input_ids"][:1] == [bos]:
            ids = [bos] + ids
        if self.tok.eos_token_id is not None:
            ids = ids + [self.tok.eos_token_id]
        return Encoded(ids, list(ids), [(0, len(ids))])


def truncate(enc: Encoded, max_len: int) -> Encoded | None:
    """Cut a conversation to ``max_len`` tokens at the end of the last whole trained turn that fits.

    Returns None when no trained turn fits whole: a response is never cut in the middle.
    """
    whole = [span for span in enc.spans if span[1] <= max_len]
    if not whole:
        return None
    cut = whole[-1][1]
    return Encoded(enc.input_ids[:cut], enc.labels[:cut], whole)


def split_text(enc: Encoded, max_len: int) -> list[Encoded]:
    """Split a long pretraining document into consecutive chunks of at most ``max_len`` tokens.

    No token is lost, except a lone last token: a chunk's first token is never a
    target, so a one-token chunk would train nothing.
    """
    out = []
    for start in range(0, len(enc.input_ids), max_len):
        ids = enc.input_ids[start : start + max_len]
        if len(ids) > 1:
            out.append(Encoded(ids, list(ids), [(0, len(ids))]))
    return out
