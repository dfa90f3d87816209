"""Build a tiny Llama-style causal LM, or a tiny Qwen3-MoE, and its tokenizer locally, from nothing.

Tests and CPU smoke runs need a real Hugging Face model directory (model,
tokenizer, chat template, generation config) without any download. The
tokenizer is a byte-level BPE trained on the synthetic corpus, so every byte
string is encodable and the vocabulary is the same on every machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.data.synthetic.corpus import tokenizer_corpus
from posttrain.errors import PosttrainError
from posttrain.io import atomic_dir

# The {% generation %} block marks what the assistant wrote (its content and
# the <|im_end|> it must learn to emit), which lets transformers return an
# assistant-token mask; it renders to nothing itself.
CHATML_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)

_BYTE_ALPHABET_SIZE = 256


def build_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1024, model_max_length: int = 1024, split_digits: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    The special tokens take ids 0-3 and are never split; ``vocab_size`` counts
    them and the 256 byte symbols. No normalizer, so decode(encode(x)) == x.
    """
    smallest = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise PosttrainError(
            f"build_tokenizer: vocab_size={vocab_size} is too small; it must be at least "
            f"{smallest} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        # One token per digit, as in Llama and Qwen: arithmetic becomes learnable digit by digit.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    backend.decoder = decoders.ByteLevel()
    # Untrimmed offsets: each character of the text lies in exactly one token's
    # span (leading spaces included), which assistant-span masking relies on.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 1024,
    max_position: int = 1024,
    tie_embeddings: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    split_digits: bool = False,
) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` with its tokenizer into ``out_dir``.

    ``intermediate`` defaults to ``4 * hidden``. The same arguments give the same
    weights and vocabulary. ``out_dir`` appears complete or not at all; an
    existing non-empty ``out_dir`` is an error unless ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    _check_target("build_tiny_model", out_dir, overwrite)
    _check_sizes("build_tiny_model", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                 max_position=max_position)

    tokenizer = build_tokenizer(tokenizer_corpus(), vocab_size, model_max_length=max_position, split_digits=split_digits)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_embeddings,
        # There is no BOS in ChatML; like Qwen, <|endoftext|> stands in where one is needed.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return _save(LlamaForCausalLM, config, tokenizer, seed, out_dir)


def build_tiny_moe(
    out_dir: str | os.PathLike,
    *,
    experts: int = 4,
    top_k: int = 2,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    expert_intermediate: int | None = None,
    vocab_size: int = 1024,
    max_position: int = 1024,
    tie_embeddings: bool = True,
    aux_loss_coef: float = 0.001,
    seed: int = 0,
    overwrite: bool = False,
    split_digits: bool = False,
) -> Path:
    """Save a randomly initialised mixture-of-experts ``Qwen3MoeForCausalLM`` with the tiny tokenizer into ``out_dir``.

    Every layer's MLP is ``experts`` experts of which each token uses ``top_k`` (softmax top-k
    routing, top-k weights renormalised as in the Qwen3 MoE releases). ``expert_intermediate``
    defaults to ``4 * hidden // top_k``, so a token's active MLP width matches the dense tiny model.
    ``aux_loss_coef`` is the config's ``router_aux_loss_coef``. Same tokenizer, chat template and
    generation config as ``build_tiny_model``; the same arguments give the same weights.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out_dir = Path(out_dir)
    _check_target("build_tiny_moe", out_dir, overwrite)
    width = 4 * hidden // max(top_k, 1) if expert_intermediate is None else expert_intermediate
    _check_sizes("build_tiny_moe", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                 max_position=max_position, experts=experts, top_k=top_k, expert_intermediate=width)
    if top_k > experts:
        raise PosttrainError(f"build_tiny_moe: top_k={top_k} must be at most experts={experts}")
    tokenizer = build_tokenizer(tokenizer_corpus(), vocab_size, model_max_length=max_position,
                                split_digits=split_digits)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,  # dense MLP width, used by no layer here (every layer is sparse)
        moe_intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        router_aux_loss_coef=aux_loss_coef,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return _save(Qwen3MoeForCausalLM, config, tokenizer, seed, out_dir)


def _check_sizes(who: str, *, hidden: int, heads: int, kv_heads: int, **sizes: int) -> None:
    for name, value in dict(sizes, hidden=hidden, heads=heads, kv_heads=kv_heads).items():
        if value < 1:
            raise PosttrainError(f"{who}: {name}={value} must be at least 1")
    if hidden % heads:
        raise PosttrainError(f"{who}: hidden={hidden} must be divisible by heads={heads}")
    if heads % kv_heads:
        raise PosttrainError(f"{who}: heads={heads} must be divisible by kv_heads={kv_heads}")


def _save(model_class, config, tokenizer, seed: int, out_dir: Path) -> Path:
    """``model_class(config)`` initialised from ``seed``, with the chat generation config, saved with the tokenizer."""
    # A private RNG stream: the caller's global torch RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        # A chat turn ends at <|im_end|>, plain text at <|endoftext|>.
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )

    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


def _check_target(who: str, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PosttrainError(f"{who}: {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PosttrainError(f"{who}: {out_dir} is not empty; choose another directory or pass overwrite=True")
