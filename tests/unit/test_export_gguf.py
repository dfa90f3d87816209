"""GGUF export: the Q/K layout, the file read back, a llama.cpp-style forward pass from it, and what is refused."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from posttrain.errors import PosttrainError

gguf = pytest.importorskip("gguf")

from posttrain.export.gguf import (
    check_supported,
    permute_qk,
    plan_tensors,
    unpermute_qk,
    verify_gguf,
    write_gguf,
)

F32 = gguf.GGMLQuantizationType.F32


def _read(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        data = np.array(t.data)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            value = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
        else:
            value = torch.from_numpy(data.copy()).reshape(shape)
        tensors[t.name] = (t.tensor_type, value)
    return meta, tensors


@pytest.fixture(scope="module")
def written(tiny_model, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    info = write_gguf(model, tokenizer, path, "float32", name="tiny", eot_id=2, log=lambda *a: None)
    return model, tokenizer, path, info


# --- Q/K layout ---------------------------------------------------------------------------------

def test_permute_qk_interleaves_the_two_halves_of_each_head():
    w = torch.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows: halves (0,1 | 2,3) and (4,5 | 6,7)
    assert permute_qk(w, 2)[:, 0].tolist() == [3 * r for r in (0, 2, 1, 3, 4, 6, 5, 7)]
    assert torch.equal(unpermute_qk(permute_qk(w, 2), 2), w)
    bias = torch.arange(12.0)  # 2 heads of 6: GGUF row 2i + j <- HF row 3j + i
    assert permute_qk(bias, 2).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    assert torch.equal(unpermute_qk(permute_qk(bias, 2), 2), bias)
    with pytest.raises(ValueError):
        permute_qk(torch.zeros(6, 2), 2)  # heads of 3 rows: no halves


def test_permuted_rows_under_adjacent_pair_rope_equal_hf_rotate_half_rope():
    head_dim, pos, theta = 8, 5, 10000.0
    x = torch.randn(head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    cos, sin = torch.cos(pos * freqs), torch.sin(pos * freqs)
    half = head_dim // 2
    hf = torch.cat([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])  # rotate_half
    g = permute_qk(x, 1)
    ggml = torch.stack([g[0::2] * cos - g[1::2] * sin, g[0::2] * sin + g[1::2] * cos], dim=-1).reshape(-1)
    assert torch.allclose(ggml, permute_qk(hf, 1))


# --- the file -----------------------------------------------------------------------------------

def test_tensors_read_back_equal_to_the_model(written):
    model, _, path, info = written
    _, tensors = _read(path)
    state = model.state_dict()
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert len(tensors) == info["tensors"] == 2 + 9 * model.config.num_hidden_layers
    assert torch.equal(tensors["token_embd.weight"][1], state["model.embed_tokens.weight"])
    assert torch.equal(tensors["output_norm.weight"][1], state["model.norm.weight"])
    q, k = tensors["blk.1.attn_q.weight"][1], tensors["blk.1.attn_k.weight"][1]
    assert not torch.equal(q, state["model.layers.1.self_attn.q_proj.weight"])  # stored permuted
    assert torch.equal(unpermute_qk(q, 4), state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(unpermute_qk(k, 2), state["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(tensors["blk.0.ffn_down.weight"][1], state["model.layers.0.mlp.down_proj.weight"])
    assert {t for t, _ in tensors.values()} == {gguf.GGMLQuantizationType.F32}


def test_metadata_read_back(written):
    _, tokenizer, path, info = written
    meta, _ = _read(path)
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    expected = {"llama.context_length": 1024, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 256, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 16, "llama.vocab_size": 1024, "general.file_type": 0}
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == info["tokenizer_pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 1024
    assert tokens[:4] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert types[:4] == [int(gguf.TokenType.CONTROL)] * 4 and set(types[4:]) == {int(gguf.TokenType.NORMAL)}
    vocab = tokenizer.get_vocab()
    assert all(vocab[t] == i for i, t in enumerate(tokens))
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) == 1024 - 256 - 4 and merges[0] == "Ġ t"
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (0, 2, 3)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    template = meta["tokenizer.chat_template"]
    # transformers' {% generation %} tag (unknown to llama.cpp's template engine) is rewritten away
    assert "generation %}" not in template and "{%- if true %}" in template and "<|im_start|>" in template


def test_verify_catches_a_changed_tensor_and_a_changed_value(written, tmp_path):
    model, _, path, _ = written
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    planned = plan_tensors(model, torch.float32)
    verify_gguf(copy, planned, {"llama.block_count": 2})
    with pytest.raises(PosttrainError, match="llama.block_count"):
        verify_gguf(copy, planned, {"llama.block_count": 3})
    reader = gguf.GGUFReader(str(copy), mode="r+")
    target = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    target.data[0, 0] += 1.0
    reader.data.flush()
    del reader
    with pytest.raises(PosttrainError, match="blk.0.attn_v.weight"):
        verify_gguf(copy, planned, {})


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _llama_cpp_forward(path, ids: list[int]) -> torch.Tensor:
    """Logits from the GGUF tensors alone, with llama.cpp's Llama conventions (RoPE on adjacent pairs)."""
    meta, tensors = _read(path)
    w = {name: value.double() for name, (_, value) in tensors.items()}
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    d = meta["llama.rope.dimension_count"]
    T = len(ids)
    x = w["token_embd.weight"][ids]
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2).double() / d)
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]

    def linear(h, name):
        out = h @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    def rope(t):  # [T, heads, d]: rotate (2i, 2i+1)
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(t.shape)

    mask = torch.full((T, T), float("-inf")).triu(1).double()
    for layer in range(meta["llama.block_count"]):
        p = f"blk.{layer}"
        h = _rms(x, w[f"{p}.attn_norm.weight"], eps)
        q = rope(linear(h, f"{p}.attn_q").view(T, n_head, d))
        k = rope(linear(h, f"{p}.attn_k").view(T, n_kv, d)).repeat_interleave(n_head // n_kv, dim=1)
        v = linear(h, f"{p}.attn_v").view(T, n_kv, d).repeat_interleave(n_head // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, n_head * d)
        x = x + linear(attn, f"{p}.attn_output")
        h = _rms(x, w[f"{p}.ffn_norm.weight"], eps)
        x = x + linear(torch.nn.functional.silu(linear(h, f"{p}.ffn_gate")) * linear(h, f"{p}.ffn_up"),
                       f"{p}.ffn_down")
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


@torch.no_grad()
def test_llama_cpp_style_forward_from_the_file_gives_the_transformers_logits(written):
    model, tokenizer, path, _ = written
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    want = model(torch.tensor([ids]), use_cache=False).logits[0].double()
    got = _llama_cpp_forward(path, ids)
    assert (got - want).abs().max() < 1e-4


@torch.no_grad()
def test_untied_model_with_biases_in_half_precision(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)  # biases start at zero; make their permutation visible
    ids = tokenizer("The sea is wide and 42 fish swim.")["input_ids"]
    for dtype, ggml in (("float16", gguf.GGMLQuantizationType.F16), ("bfloat16", gguf.GGMLQuantizationType.BF16)):
        half = LlamaForCausalLM(config).eval()
        half.load_state_dict(model.state_dict())
        half = half.to(getattr(torch, dtype))
        path = tmp_path / f"{dtype}.gguf"
        write_gguf(half, tokenizer, path, dtype, name="untied", log=lambda *a: None)
        meta, tensors = _read(path)
        assert tensors["output.weight"][0] == ggml and tensors["blk.0.attn_norm.weight"][0] == F32
        assert tensors["blk.0.attn_q.bias"][0] == F32
        assert torch.equal(unpermute_qk(tensors["blk.0.attn_k.bias"][1], 2),
                           half.model.layers[0].self_attn.k_proj.bias.float())
        assert torch.equal(tensors["output.weight"][1], half.lm_head.weight)
        assert meta["general.file_type"] == {"float16": 1, "bfloat16": 32}[dtype]
        reference = half.float()(torch.tensor([ids]), use_cache=False).logits[0].double()
        assert (_llama_cpp_forward(path, ids) - reference).abs().max() < 1e-4


def test_linear_rope_scaling_and_a_wider_head_are_written(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0})
    write_gguf(LlamaForCausalLM(config), tokenizer, tmp_path / "m.gguf", "float32", name="m", log=lambda *a: None)
    meta, tensors = _read(tmp_path / "m.gguf")
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    assert meta["llama.rope.freq_base"] == 50000.0 and meta["llama.rope.dimension_count"] == 32
    assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == 32
    assert list(tensors["blk.0.attn_q.weight"][1].shape) == [64, 32]


# --- refused ------------------------------------------------------------------------------------

def test_other_architectures_are_refused(tiny_model, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(PosttrainError, match="model_type is 'qwen2'"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "float32", name="q", log=lambda *a: None)
    assert not (tmp_path / "m.gguf").exists()
    llama3 = LlamaConfig(vocab_size=len(tokenizer), rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                         "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})
    with pytest.raises(PosttrainError, match="rope_type 'llama3'"):
        check_supported(llama3, tokenizer)


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tiny_model):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = AutoModelForCausalLM.from_pretrained(tiny_model).config
    word_level = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(PosttrainError, match="byte-level BPE"):
        check_supported(config, PreTrainedTokenizerFast(tokenizer_object=word_level))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(PosttrainError, match="Lowercase normalizer"):
        check_supported(config, tokenizer)


def test_pre_tokenizers_map_to_the_llama_cpp_rules_that_split_alike(tiny_model):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from posttrain.export.gguf import _LLAMA3_SPLIT
    from posttrain.models.tiny import build_tokenizer

    config = AutoModelForCausalLM.from_pretrained(tiny_model).config
    split = build_tokenizer(["hello world 1234 and 56"] * 20, vocab_size=270, split_digits=True)
    assert check_supported(config, split) == "smollm"
    assert check_supported(config, build_tokenizer(["hello world"] * 20, vocab_size=270)) == "gpt-2"

    def variant(pre_tokenizer, ignore_merges):
        spec = json.loads(AutoTokenizer.from_pretrained(tiny_model).backend_tokenizer.to_str())
        spec["pre_tokenizer"] = pre_tokenizer
        spec["model"]["ignore_merges"] = ignore_merges
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))

    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert check_supported(config, variant(llama3, ignore_merges=True)) == "llama-bpe"
    with pytest.raises(PosttrainError, match="no pre-tokenizer known"):
        check_supported(config, variant(llama3, ignore_merges=False))
    with pytest.raises(PosttrainError, match="no pre-tokenizer known"):
        check_supported(config, variant({"type": "Whitespace"}, ignore_merges=False))
