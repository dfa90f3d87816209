"""Load a causal LM and its tokenizer from a local folder or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.config import ModelConfig
from posttrain.errors import PosttrainError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _where(name: str) -> str:
    return "folder" if Path(name).exists() else "hub id (needs network, or the model in the local HF cache)"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"cannot load the tokenizer of model.name_or_path={cfg.name_or_path!r} ({_where(cfg.name_or_path)}): {exc}") from None
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is always present.
        tok.pad_token = tok.eos_token
    return tok


def resolve_dtype(cfg: ModelConfig, tuning_mode: str) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # Full-precision master weights for anything the optimizer updates in place; a frozen
    # base under adapters can live in bf16 on GPU and halve its memory.
    if tuning_mode == "lora" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_adapter_folder(name: str) -> bool:
    return (Path(name) / "adapter_config.json").is_file()


def load_model(cfg: ModelConfig, tuning_mode: str = "full"):
    """The causal LM of ``cfg``; a LoRA run's output (an adapter folder) is loaded onto its base and merged.

    Merging makes the adapter's training part of the starting model, so a later stage (DPO after
    LoRA SFT) starts from, and takes as its reference, the SFT model and not the bare base.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": resolve_dtype(cfg, tuning_mode), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        if is_adapter_folder(cfg.name_or_path):
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"cannot load model.name_or_path={cfg.name_or_path!r} ({_where(cfg.name_or_path)}): {exc}") from None


def disable_dropout(model) -> int:
    """Set every dropout probability to 0 (dropout layers and attention dropout); returns how many were on.

    Preference and RL losses compare the policy with a reference scored without dropout; with
    dropout on, the two differ at step 0 and the implicit rewards start biased.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            n += 1
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout = 0.0
            n += 1
    return n
