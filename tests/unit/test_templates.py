"""Chat rendering and assistant-only label masks, checked token by token.

Expected masks are derived here independently of ``ChatEncoder``: the render is
rebuilt by hand from the template's known format, the character range of each
assistant content (plus its end-of-turn token) is located in that string, and
every token's offsets are compared against those ranges.
"""

import pytest
from transformers import AutoTokenizer

from posttrain.data.formats import Example, normalise
from posttrain.data.templates import (
    IGNORE_INDEX,
    ChatEncoder,
    Encoded,
    resolve_chat_template,
    split_text,
    truncate,
)
from posttrain.errors import PosttrainError
from posttrain.models.tiny import CHATML_TEMPLATE

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 23 + 45?"},
    {"role": "assistant", "content": "68"},
    {"role": "user", "content": "And times two?"},
    # Leading space, inner double space and a newline: all belong to the response.
    {"role": "assistant", "content": " 136, that is  the answer.\nDone"},
]

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)  # a separate copy: the shared one stays ChatML
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


# --- independent expectations -------------------------------------------------------------


def chatml_render(messages):
    """The ChatML render and, per assistant turn, the char range of content + <|im_end|>."""
    text, spans = "", []
    for m in messages:
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def llama3_render(messages):
    text, spans = "<|begin_of_text|>", []
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


def expected_labels(tok, text, char_spans):
    """Labels token by token: trained iff the token lies inside one of ``char_spans``."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = [a <= s and e <= b for a, b in char_spans]
        # The expectation is only well defined if no token straddles a span boundary.
        assert not any(s < a < e or s < b < e for a, b in char_spans), (s, e, text[s:e])
        labels.append(tid if any(inside) else IGNORE_INDEX)
    return enc["input_ids"], labels


def trained_runs(enc: Encoded) -> list[list[int]]:
    """Maximal runs of consecutive trained token ids."""
    runs, current = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def assert_masks(tok, enc: Encoded, text, char_spans, eot):
    ids, labels = expected_labels(tok, text, char_spans)
    assert enc.input_ids == ids
    for t, (tid, got, want) in enumerate(zip(enc.input_ids, enc.labels, labels)):
        assert got == want, f"token {t} {tok.decode([tid])!r}: label {got}, expected {want}"
        assert got in (IGNORE_INDEX, tid)
    # Each trained run decodes to exactly one turn's span text, ending with the end-of-turn token.
    runs = [tok.decode(run) for run in trained_runs(enc)]
    assert runs == [text[a:b] for a, b in char_spans]
    assert all(run.endswith(eot) for run in runs)
    # spans point at exactly those runs.
    assert len(enc.spans) == len(char_spans)
    trained_positions = {t for t, lab in enumerate(enc.labels) if lab != IGNORE_INDEX}
    assert trained_positions == {t for a, b in enc.spans for t in range(a, b)}
    assert enc.n_trained == len(trained_positions)


# --- ChatML ----------------------------------------------------------------------------------


def test_chatml_render_matches_the_hand_built_one(tokenizer):
    text, _ = chatml_render(CONVERSATION)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text


def test_chatml_end_of_turn_is_im_end(tokenizer):
    encoder = ChatEncoder(tokenizer)
    assert encoder.end_of_turn == IM_END
    assert encoder.end_of_turn_id == tokenizer.convert_tokens_to_ids(IM_END)


def test_chatml_masks_token_by_token(tokenizer):
    enc = ChatEncoder(tokenizer).encode_messages(CONVERSATION)
    text, spans = chatml_render(CONVERSATION)
    assert_masks(tokenizer, enc, text, spans, IM_END)
    assert [tokenizer.decode(r) for r in trained_runs(enc)] == [
        "68<|im_end|>",
        " 136, that is  the answer.\nDone<|im_end|>",
    ]


def test_chatml_masks_leave_headers_prompts_and_trailing_newline_untrained(tokenizer):
    enc = ChatEncoder(tokenizer).encode_messages(CONVERSATION)
    im_start = tokenizer.convert_tokens_to_ids(IM_START)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for t, (tid, lab) in enumerate(zip(enc.input_ids, enc.labels)):
        if tid == im_start:
            assert lab == IGNORE_INDEX
        if t > 0 and enc.input_ids[t - 1] == im_end:  # the "\n" after every <|im_end|>
            assert tid == newline[0] and lab == IGNORE_INDEX
    # <|im_end|> is trained exactly for the two assistant turns, not for system or user turns.
    ends = [lab != IGNORE_INDEX for tid, lab in zip(enc.input_ids, enc.labels) if tid == im_end]
    assert ends == [False, False, True, False, True]
    untrained = tokenizer.decode([tid for tid, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    for m in CONVERSATION[:2] + CONVERSATION[3:4]:
        assert m["content"] in untrained
    assert untrained.count(f"{IM_START}assistant\n") == 2


def test_last_assistant_trains_only_the_last_turn(tokenizer):
    enc = ChatEncoder(tokenizer, train_on="last_assistant").encode_messages(CONVERSATION)
    text, spans = chatml_render(CONVERSATION)
    assert_masks(tokenizer, enc, text, spans[-1:], IM_END)
    everything = ChatEncoder(tokenizer).encode_messages(CONVERSATION)
    assert enc.input_ids == everything.input_ids
    assert enc.n_trained < everything.n_trained


# --- Llama 3 style -------------------------------------------------------------------------


def test_llama3_render_matches_the_hand_built_one(llama3_tokenizer):
    text, _ = llama3_render(CONVERSATION)
    assert llama3_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == text


def test_llama3_end_of_turn_is_eot_id(llama3_tokenizer):
    encoder = ChatEncoder(llama3_tokenizer)
    assert encoder.end_of_turn == "<|eot_id|>"
    assert encoder.end_of_turn_id == llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_llama3_masks_token_by_token(llama3_tokenizer):
    enc = ChatEncoder(llama3_tokenizer).encode_messages(CONVERSATION)
    text, spans = llama3_render(CONVERSATION)
    assert_masks(llama3_tokenizer, enc, text, spans, "<|eot_id|>")
    # The template strips content, so the leading space of the second answer is not there.
    assert [llama3_tokenizer.decode(r) for r in trained_runs(enc)] == [
        "68<|eot_id|>",
        "136, that is  the answer.\nDone<|eot_id|>",
    ]
    header_ids = set(llama3_tokenizer.convert_tokens_to_ids(LLAMA3_SPECIALS[:3]))
    assert all(lab == IGNORE_INDEX for tid, lab in zip(enc.input_ids, enc.labels) if tid in header_ids)


# --- tokens across a turn boundary, and the end-of-turn token ------------------------------

COLON_TEMPLATE = (
    "{%- for message in messages %}{{- message['role'] + ': ' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)


def test_token_straddling_the_start_of_a_response_is_trained(tiny_model):
    # "assistant: " + "answer ..." puts the template's space and the answer's first letters
    # in one token; it carries the response's start, so it is trained (tokens overlap the span).
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = COLON_TEMPLATE
    messages = [{"role": "user", "content": "What now?"}, {"role": "assistant", "content": "answer is 4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "user: What now?<|im_end|>\nassistant: answer is 4<|im_end|>\n"
    start = text.index("answer")
    end = text.rindex(IM_END) + len(IM_END)
    enc = ChatEncoder(tok).encode_messages(messages)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    straddling = [t for t, (s, e) in enumerate(offsets) if s < start < e]
    assert straddling, "the test needs a token across the boundary"
    for t, (s, e) in enumerate(offsets):
        trained = e > start and s < end
        assert (enc.labels[t] != IGNORE_INDEX) == trained, (t, text[s:e])
    assert enc.labels[straddling[0]] != IGNORE_INDEX
    assert tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]) == " answer is 4<|im_end|>"


def test_end_of_turn_is_the_first_special_token_after_the_content(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    old = "'<|im_end|>' }}{%- endgeneration %}"
    tok.chat_template = CHATML_TEMPLATE.replace(old, "'<|im_end|><|endoftext|>' }}{%- endgeneration %}")
    assert "<|im_end|><|endoftext|>" in tok.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
    )
    encoder = ChatEncoder(tok)
    assert encoder.end_of_turn == IM_END
    # The span still ends at the last <|im_end|>: the <|endoftext|> after it is not trained.
    enc = encoder.encode_messages(CONVERSATION[:3])
    assert tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]) == "68<|im_end|>"


# --- alpaca --------------------------------------------------------------------------------


def test_alpaca_row_trains_history_answers_and_output(tokenizer):
    row = {
        "system": "Answer in numbers.",
        "history": [["What is 2 + 2?", "4"], ["And 3 + 3?", "6"]],
        "instruction": "Add these numbers.",
        "input": "10 and 20",
        "output": "30",
    }
    ex = normalise(row, "alpaca", file="mem.jsonl", row_no=0)
    assert isinstance(ex, Example)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert ex.messages[-2]["content"] == "Add these numbers.\n\n10 and 20"
    enc = ChatEncoder(tokenizer).encode_messages(ex.messages)
    text, spans = chatml_render(ex.messages)
    assert_masks(tokenizer, enc, text, spans, IM_END)
    assert [tokenizer.decode(r) for r in trained_runs(enc)] == ["4<|im_end|>", "6<|im_end|>", "30<|im_end|>"]


# --- resolving a template ------------------------------------------------------------------


def test_missing_chat_template_names_the_config_field(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    with pytest.raises(PosttrainError, match=r"model\.chat_template"):
        resolve_chat_template(tok, None)
    assert ChatEncoder(tok).end_of_turn is None


def test_chat_template_from_a_file_is_installed(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    resolve_chat_template(tok, str(path))
    assert tok.chat_template == LLAMA3_TEMPLATE


def test_inline_chat_template_is_installed(tiny_model):
    # A real template is longer than a file name may be; it must not be mistaken for a bad path.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    assert max(len(part) for part in CHATML_TEMPLATE.split("/")) > 255
    resolve_chat_template(tok, CHATML_TEMPLATE)
    assert tok.chat_template == CHATML_TEMPLATE


# --- truncation and text -------------------------------------------------------------------


TWO_TURNS = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue, like the sky on a clear day."},
    {"role": "user", "content": "Name another one."},
    {"role": "assistant", "content": "Green, like grass after the rain."},
]


def test_truncate_keeps_whole_first_turn_and_never_cuts_a_response(tokenizer):
    enc = ChatEncoder(tokenizer).encode_messages(TWO_TURNS)
    assert len(enc.spans) == 2
    first_end = enc.spans[0][1]
    assert enc.input_ids[first_end - 1] == tokenizer.convert_tokens_to_ids(IM_END)
    second_end = enc.spans[1][1]
    assert second_end == len(enc.input_ids) - 1  # only ChatML's "\n" follows the last <|im_end|>
    for max_len in range(first_end, second_end):
        cut = truncate(enc, max_len)
        assert cut is not None
        assert cut.input_ids == enc.input_ids[:first_end]
        assert cut.labels == enc.labels[:first_end]
        assert cut.spans == enc.spans[:1]
        assert tokenizer.decode([t for t, lab in zip(cut.input_ids, cut.labels) if lab != IGNORE_INDEX]) == (
            "Blue, like the sky on a clear day.<|im_end|>"
        )
    for max_len in range(1, first_end):
        assert truncate(enc, max_len) is None
    both = truncate(enc, second_end)
    assert both.spans == enc.spans
    assert both.input_ids == enc.input_ids[:second_end]
    assert both.labels == enc.labels[:second_end]


def test_truncate_returns_none_when_the_only_response_does_not_fit(tokenizer):
    enc = ChatEncoder(tokenizer).encode_messages(TWO_TURNS[:2])
    assert truncate(enc, enc.spans[0][1] - 1) is None
    assert truncate(enc, enc.spans[0][1]).spans == enc.spans


def test_encode_text_appends_eos_and_trains_every_token(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    enc = ChatEncoder(tokenizer).encode_text(text)
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == plain + [tokenizer.eos_token_id]
    assert enc.labels == enc.input_ids
    assert enc.n_trained == len(enc.input_ids)
    assert enc.spans == [(0, len(enc.input_ids))]


@pytest.mark.parametrize("max_len", [2, 3, 4, 5, 7, 8, 16, 1000])
def test_split_text_loses_no_token(tokenizer, max_len):
    text = "Packing and splitting must keep every token of a long document, in order. " * 3
    enc = ChatEncoder(tokenizer).encode_text(text)
    n = len(enc.input_ids)
    chunks = split_text(enc, max_len)
    joined = [t for c in chunks for t in c.input_ids]
    if n % max_len == 1:
        # Only a lone last token is left out: a chunk's first token is never a target.
        assert joined == enc.input_ids[:-1]
    else:
        assert joined == enc.input_ids
    for c in chunks:
        assert 2 <= len(c.input_ids) <= max_len
        assert c.labels == c.input_ids
        assert c.spans == [(0, len(c.input_ids))]
    assert all(len(c.input_ids) == max_len for c in chunks[:-1])
