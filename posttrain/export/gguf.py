"""Write a Llama-architecture model as one GGUF file for llama.cpp, and check it by reading it back.

Scope: ``model_type == "llama"`` with SiLU MLPs and default (or linear-scaled) RoPE, and a
byte-level BPE tokenizer (GPT-2 style) without a normalizer. Anything else is refused with the
reason; llama.cpp's own ``convert_hf_to_gguf.py`` covers the rest.

What llama.cpp expects, and what this writes:

- tensor names ``token_embd``, ``blk.N.attn_norm / attn_q / attn_k / attn_v / attn_output /
  ffn_norm / ffn_gate / ffn_up / ffn_down``, ``output_norm``, ``output`` (left out when the
  embeddings are tied: llama.cpp then reuses ``token_embd``);
- Q and K rows reordered per head. Hugging Face's Llama applies RoPE to the two *halves* of a
  head (rotate_half: dimension i pairs with i + d/2); llama.cpp's Llama graph rotates *adjacent*
  pairs (2i, 2i+1). Row 2i + j of a GGUF head is row j * d/2 + i of the HF head (K uses the
  key-value head count). ``permute_qk`` / ``unpermute_qk`` are that map and its inverse;
- 2-D weights in the chosen float type (F32, F16 or BF16), 1-D tensors (norms, biases) in F32;
- the hyperparameters llama.cpp reads under ``llama.*`` and the tokenizer under
  ``tokenizer.ggml.*`` (model "gpt2", the pre-tokenizer name whose split rules match the
  Hugging Face pre-tokenizer, tokens, token types, merges, special ids) and the chat template.

Verification reads the file back with ``gguf.GGUFReader``: every metadata key and value as
written, every tensor present with its shape and type, and its values (Q/K un-permuted) equal
to the source tensor.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posttrain.errors import MissingExtraError, PosttrainError

ARCH = "llama"
GGUF_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# Hugging Face pre-tokenizer split rules -> the llama.cpp pre-tokenizer with the same rules.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GENERATION_OPEN = re.compile(r"\{%(-?)\s*generation\s*(-?)%\}")
_GENERATION_CLOSE = re.compile(r"\{%(-?)\s*endgeneration\s*(-?)%\}")


def check_gguf_available() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError("gguf", "export", "--gguf")


# --- Q/K layout ---------------------------------------------------------------------------------

def _interleave_rows(rows: int, n_heads: int) -> torch.Tensor:
    """Index of the HF row that lands in each GGUF row: GGUF row h*d + 2i + j <- HF row h*d + j*d/2 + i."""
    if n_heads < 1 or rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    head_dim = rows // n_heads
    half = head_dim // 2
    i = torch.arange(half).repeat_interleave(2)
    j = torch.arange(2).repeat(half)
    return (torch.arange(n_heads)[:, None] * head_dim + (j * half + i)[None, :]).reshape(-1)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q or K weight (or bias) rows from Hugging Face's rotate-half layout to llama.cpp's interleaved one."""
    return w.index_select(0, _interleave_rows(w.shape[0], n_heads))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_qk``."""
    out = torch.empty_like(w)
    out[_interleave_rows(w.shape[0], n_heads)] = w
    return out


# --- what is supported --------------------------------------------------------------------------

def check_supported(config, tokenizer) -> str:
    """Refuse what this writer cannot express; returns the llama.cpp pre-tokenizer name for ``tokenizer``."""
    model_type = getattr(config, "model_type", None)
    if model_type != ARCH:
        raise PosttrainError(
            f"export: GGUF export supports Llama-architecture models (model_type 'llama'); this model's model_type "
            f"is {model_type!r}. Convert it with llama.cpp's convert_hf_to_gguf.py instead"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise PosttrainError(f"export: GGUF export needs hidden_act 'silu' (llama.cpp's Llama MLP); got "
                             f"{config.hidden_act!r}")
    rope_type, _, _ = _rope(config)
    if rope_type not in ("default", "linear"):
        raise PosttrainError(
            f"export: GGUF export supports default and linear RoPE; this model uses rope_type {rope_type!r} "
            f"(convert it with llama.cpp's convert_hf_to_gguf.py)"
        )
    if _head_dim(config) % 2:
        raise PosttrainError(f"export: GGUF export needs an even head_dim for RoPE; got {_head_dim(config)}")
    top = max(tokenizer.get_vocab().values())
    if top >= config.vocab_size:
        raise PosttrainError(
            f"export: the tokenizer has token id {top} but the model only {config.vocab_size} embedding rows"
        )
    return _pre_tokenizer(tokenizer)


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PosttrainError("export: GGUF export needs a fast (tokenizers-backed) tokenizer; this one is slow")
    return json.loads(backend.to_str())


def _pre_tokenizer(tokenizer) -> str:
    spec = _backend(tokenizer)
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or model.get("byte_fallback"):
        raise PosttrainError(
            f"export: GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in Llama 3 or the tiny "
            f"model); this tokenizer is a {model.get('type')} model with a {decoder.get('type')} decoder "
            f"(SentencePiece-style tokenizers need llama.cpp's convert_hf_to_gguf.py)"
        )
    if spec.get("normalizer"):
        raise PosttrainError(
            f"export: the tokenizer has a {spec['normalizer'].get('type')} normalizer, which llama.cpp's byte-level "
            f"BPE does not apply; text would be tokenized differently"
        )
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    # llama.cpp's Llama 3 rules look a whole word up before merging (ignore_merges); the others merge.
    if _is_llama3_split(parts) and model.get("ignore_merges"):
        return "llama-bpe"
    if not model.get("ignore_merges"):
        if _byte_level(parts, use_regex=True):
            return "gpt-2"
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and _byte_level(parts[1:], use_regex=True)):
            # Each digit its own piece, then the GPT-2 rules; llama.cpp's "smollm" keeps spaces as decoded
            # (clean_spaces off), its "refact" has the same splits with the spaces cleaned.
            return "refact" if getattr(tokenizer, "clean_up_tokenization_spaces", False) else "smollm"
    raise PosttrainError(
        f"export: llama.cpp has no pre-tokenizer known to match this tokenizer's ({json.dumps(pre)[:200]}, "
        f"ignore_merges={bool(model.get('ignore_merges'))}); GGUF export supports the GPT-2 byte-level rules, digit "
        f"splitting + GPT-2 and the Llama 3 rules"
    )


def _is_llama3_split(parts: list[dict]) -> bool:
    if len(parts) != 2 or parts[0].get("type") != "Split":
        return False
    split = parts[0]
    return ((split.get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT and split.get("behavior") == "Isolated"
            and not split.get("invert") and _byte_level(parts[1:], use_regex=False))


def _byte_level(parts: list[dict], use_regex: bool) -> bool:
    return (len(parts) == 1 and parts[0].get("type") == "ByteLevel" and not parts[0].get("add_prefix_space")
            and bool(parts[0].get("use_regex", True)) == use_regex)


def _rope(config) -> tuple[str, float, float | None]:
    """(rope type, base frequency, linear scaling factor) from transformers 5's rope_parameters or older fields."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope_type, float(theta), params.get("factor")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# --- tensors ------------------------------------------------------------------------------------

_TOP = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
_BLOCK = {
    "input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT", "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_tensor_name(hf_key: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama state-dict key, or None when it has no place in the layout."""
    import gguf

    names = gguf.TENSOR_NAMES
    module, _, kind = hf_key.rpartition(".")
    if module in _TOP and kind == "weight":
        return f"{names[gguf.MODEL_TENSOR[_TOP[module]]]}.{kind}"
    m = _LAYER_KEY.fullmatch(hf_key)
    if m and m.group(2) in _BLOCK:
        return f"{names[gguf.MODEL_TENSOR[_BLOCK[m.group(2)]]].format(bid=int(m.group(1)))}.{m.group(3)}"
    return None


@dataclass
class PlannedTensor:
    name: str  # in the GGUF file
    source: str  # Hugging Face state-dict key
    tensor: torch.Tensor  # Hugging Face layout, in the dtype written
    heads: int | None = None  # Q/K: the head count of the row permutation

    def file_layout(self) -> torch.Tensor:
        return permute_qk(self.tensor, self.heads) if self.heads else self.tensor


def plan_tensors(model, dtype: torch.dtype) -> list[PlannedTensor]:
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    planned = []
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output is absent
        name = gguf_tensor_name(key)
        if name is None:
            raise PosttrainError(f"export: the tensor {key} has no place in llama.cpp's Llama layout")
        kind = name.split(".")[-2]
        tensor = value.detach().to("cpu", torch.float32 if value.dim() == 1 else dtype).contiguous()
        planned.append(PlannedTensor(name, key, tensor, heads.get(kind)))
    return planned


def _encode(t: torch.Tensor):
    """(numpy array, raw GGML type or None); bfloat16 goes as raw bytes since numpy has no bfloat16."""
    import gguf

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint8), gguf.GGMLQuantizationType.BF16
    return t.contiguous().numpy(), None


def _decode(rt) -> torch.Tensor:
    import gguf

    data = np.array(rt.data)
    shape = [int(x) for x in reversed(rt.shape.tolist())]
    if rt.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(data.copy()).reshape(shape)


# --- metadata -----------------------------------------------------------------------------------

def gguf_chat_template(tokenizer) -> str | None:
    """The chat template as llama.cpp can parse it: transformers' {% generation %} marker (it renders
    nothing; it only tags assistant tokens for training masks) becomes an always-true if block."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not _GENERATION_OPEN.search(template):
        return template if isinstance(template, str) else None
    rewritten = _GENERATION_CLOSE.sub(r"{%\1 endif \2%}", _GENERATION_OPEN.sub(r"{%\1 if true \2%}", template))
    _check_same_renders(tokenizer, rewritten)
    return rewritten


def _check_same_renders(tokenizer, rewritten: str) -> None:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from posttrain.export.verify import PROBE_CHATS

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    template = env.from_string(rewritten)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    for chat in PROBE_CHATS:
        for prompt in (False, True):
            try:
                want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            except (TemplateError, ValueError):  # a conversation the template rejects (e.g. a system role)
                continue
            try:
                got = template.render(messages=chat, add_generation_prompt=prompt, **specials)
            except TemplateError:
                got = None
            if got != want:
                raise PosttrainError(
                    "export: the chat template's {% generation %} blocks could not be rewritten for llama.cpp "
                    "without changing what it renders; remove them from the template (they only matter for training)"
                )


def _add_hparams(writer, config, dtype: str, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = _head_dim(config)
    rope_type, theta, factor = _rope(config)
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    file_types = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                  "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(int(file_types[dtype]))


def _special_tokens_added(tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS around the text (llama.cpp's add_bos_token / add_eos_token)."""
    plain = list(tokenizer("Hello world", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("Hello world", add_special_tokens=True)["input_ids"])
    for add_bos in (False, True):
        for add_eos in (False, True):
            if full == [bos] * add_bos + plain + [eos] * add_eos:
                return add_bos, add_eos
    raise PosttrainError(
        "export: the tokenizer adds special tokens around the text other than BOS/EOS "
        f"({full[:4]}... for {plain[:4]}...), which llama.cpp cannot reproduce"
    )


def _add_tokenizer(writer, tokenizer, config, pre: str, eot_id: int | None) -> str | None:
    import gguf

    spec = _backend(tokenizer)
    by_id = {i: s for s, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer (a padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _first(config.bos_token_id)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _first(config.eos_token_id)
    add_bos, add_eos = _special_tokens_added(tokenizer, bos, eos)
    for setter, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(int(value))
    if eot_id is not None and eot_id != eos:
        writer.add_eot_token_id(int(eot_id))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = gguf_chat_template(tokenizer)
    if template:
        writer.add_chat_template(template)
    return template


def _first(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


# --- write + verify -----------------------------------------------------------------------------

def write_gguf(model, tokenizer, path: Path, dtype: str, *, name: str, eot_id: int | None = None, log=print) -> dict:
    """Write ``model`` (a LlamaForCausalLM whose weights are in ``dtype``) to ``path``; read it back and compare."""
    import gguf

    check_gguf_available()
    pre = check_supported(model.config, tokenizer)
    planned = plan_tensors(model, getattr(torch, dtype))
    writer = gguf.GGUFWriter(str(path), ARCH)
    _add_hparams(writer, model.config, dtype, name)
    template = _add_tokenizer(writer, tokenizer, model.config, pre, eot_id)
    expected = {key: _plain(v.value) for key, v in writer.kv_data[0].items()}
    for t in planned:
        array, raw = _encode(t.file_layout())
        writer.add_tensor(t.name, array, raw_dtype=raw)
    log(f"writing {path.name}: {len(planned)} tensors, {GGUF_TYPES[dtype]}, tokenizer pre '{pre}'")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    verify_gguf(path, planned, expected)
    log(f"{path.name} read back: {len(expected)} metadata keys and {len(planned)} tensors as written")
    return {"file": path.name, "type": GGUF_TYPES[dtype], "tensors": len(planned), "metadata_keys": len(expected),
            "tokenizer_pre": pre, "chat_template": bool(template), "bytes": path.stat().st_size,
            "verified": "read back with gguf.GGUFReader: metadata and tensors equal to the source (Q/K un-permuted)"}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.floating, float)):
        return float(value)
    return int(value)


def _same(want, got) -> bool:
    if isinstance(want, list):
        return isinstance(got, list) and len(want) == len(got) and all(_same(w, g) for w, g in zip(want, got))
    if isinstance(want, float):
        return np.float32(want) == np.float32(got)
    return want == got


def verify_gguf(path: Path, planned: list[PlannedTensor], expected: dict) -> None:
    """Raise unless ``path`` holds exactly ``expected`` metadata and the ``planned`` tensors."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    problems = []
    for key, want in expected.items():
        field = reader.fields.get(key)
        got = field.contents() if field is not None else None
        if field is None or not _same(want, got):
            problems.append(f"metadata {key}: wrote {str(want)[:60]!r}, read {str(got)[:60]!r}")
    found = {t.name: t for t in reader.tensors}
    wanted = {t.name for t in planned}
    problems += [f"tensor {n} missing" for n in sorted(wanted - set(found))]
    problems += [f"unexpected tensor {n}" for n in sorted(set(found) - wanted)]
    for t in planned:
        rt = found.get(t.name)
        if rt is None:
            continue
        shape = [int(x) for x in reversed(rt.shape.tolist())]
        if shape != list(t.tensor.shape):
            problems.append(f"tensor {t.name}: shape {shape}, expected {list(t.tensor.shape)}")
            continue
        values = _decode(rt)
        if t.heads:
            values = unpermute_qk(values, t.heads)
        if values.dtype != t.tensor.dtype or not torch.equal(values, t.tensor):
            problems.append(f"tensor {t.name} ({values.dtype}) differs from {t.source} ({t.tensor.dtype})")
    if problems:
        raise PosttrainError(f"export: {path} does not read back as written: " + "; ".join(problems[:5]))
