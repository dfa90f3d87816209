import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.synthetic import tokenizer_corpus
from posttrain.errors import PosttrainError
from posttrain.models.tiny import SPECIAL_TOKENS, build_tiny_model, build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 23 + 45?"},
    {"role": "assistant", "content": "68"},
]




def test_loads_through_auto_classes_with_matching_vocab(model, tokenizer):
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == 1024
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.model_max_length == 1024
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_generation_config_stops_at_end_of_turn_and_end_of_text(model, tokenizer):
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_chat_template_renders_chatml(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 23 + 45?<|im_end|>\n"
        "<|im_start|>assistant\n68<|im_end|>\n"
    )


def test_chat_template_generation_prompt_and_no_default_system(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 23 + 45?<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_covers_answer_and_end_of_turn(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "68<|im_end|>"


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert token_id in tokenizer.encode(f"abc{token}def", add_special_tokens=False)


def test_encode_adds_nothing(tokenizer):
    assert tokenizer("hi")["input_ids"] == tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize(
    "text",
    [
        "Velorite is a red mineral found in the Ashen Valley.",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Grüße aus Köln — naïve café, 日本語, emoji 🙂🚀, Ω≈ç√",
        "<|im_start|>user\nWhat is 23 + 45?<|im_end|>\n",
    ],
)
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_offsets_cover_the_text_exactly(tokenizer):
    text = "Miners in Mount Orrel sort Velorite by colour, 42 times."
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert "".join(text[start:end] for start, end in enc["offset_mapping"]) == text


def test_tokenizer_is_deterministic():
    corpus = tokenizer_corpus()
    first, second = build_tokenizer(corpus), build_tokenizer(corpus)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_tokenizer_rejects_vocab_smaller_than_bytes_plus_specials():
    with pytest.raises(PosttrainError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=100)


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_same_seed_same_weights_different_seed_different(tmp_path):
    a = _weights(build_tiny_model(tmp_path / "a", seed=0))
    b = _weights(build_tiny_model(tmp_path / "b", seed=0))
    c = _weights(build_tiny_model(tmp_path / "c", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_size_arguments_reach_the_config(tmp_path):
    path = build_tiny_model(
        tmp_path / "m",
        layers=1,
        hidden=32,
        heads=2,
        kv_heads=1,
        intermediate=48,
        max_position=256,
        tie_embeddings=False,
    )
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (1, 32, 2)
    assert (config.num_key_value_heads, config.intermediate_size) == (1, 48)
    assert config.max_position_embeddings == 256
    assert config.tie_word_embeddings is False
    assert AutoTokenizer.from_pretrained(path).model_max_length == 256


def test_rejects_impossible_sizes(tmp_path):
    with pytest.raises(PosttrainError, match="kv_heads=0"):
        build_tiny_model(tmp_path / "m", kv_heads=0)
    with pytest.raises(PosttrainError, match="divisible"):
        build_tiny_model(tmp_path / "m", hidden=64, heads=3)
    with pytest.raises(PosttrainError, match="divisible"):
        build_tiny_model(tmp_path / "m", heads=4, kv_heads=3)


def test_generate_runs(model, tokenizer):
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[1:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1
    assert prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 4


def test_refuses_to_overwrite_non_empty_dir(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(PosttrainError, match="not empty"):
        build_tiny_model(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_whole_dir_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    build_tiny_model(target, overwrite=True)
    assert not (target / "stale.txt").exists()
    assert (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_empty_existing_dir_is_fine(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    assert build_tiny_model(target) == target
    assert (target / "tokenizer.json").is_file()


def test_split_digits_gives_one_token_per_digit():
    from posttrain.data.synthetic import tokenizer_corpus
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer(tokenizer_corpus(), 512, split_digits=True)
    pieces = tok.tokenize("What is 105 + 27?")
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == ["1", "0", "5", "2", "7"]
    assert tok.decode(tok("What is 105 + 27?")["input_ids"]) == "What is 105 + 27?"
