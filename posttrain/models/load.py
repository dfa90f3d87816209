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


def resolve_dtype(cfg: ModelConfig, tuning_mode: str, qlora=None) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if tuning_mode == "qlora":
        from posttrain.config import QloraConfig
        from posttrain.tuning.qlora import compute_dtype

        return compute_dtype(qlora or QloraConfig())
    # Full-precision master weights for anything the optimizer updates in place; a frozen
    # base under adapters can live in bf16 on GPU and halve its memory.
    if tuning_mode == "lora" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_adapter_folder(name: str) -> bool:
    return (Path(name) / "adapter_config.json").is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``); a clear error when it names none."""
    import json

    path = Path(folder) / "adapter_config.json"
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise PosttrainError(f"cannot read {path}: {exc}") from None
    if not base:
        raise PosttrainError(f"{path} names no base model (base_model_name_or_path)")
    return base


def root_model(name: str) -> str:
    """The full model under a chain of adapter folders (LoRA DPO on a LoRA SFT run names that run's adapter)."""
    seen = set()
    while is_adapter_folder(name) and name not in seen:
        seen.add(name)
        name = adapter_base(name)
    return name


def load_model(cfg: ModelConfig, tuning_mode: str = "full", qlora=None):
    """The causal LM of ``cfg``; an adapter folder is loaded onto its base (itself loaded this way, recursively).

    LoRA and IA3 adapters are merged: the adapter's training becomes part of the starting model, so a
    later stage (DPO after LoRA SFT) starts from, and takes as its reference, the SFT model and not the
    bare base. The merged model's ``name_or_path`` is the adapter folder, so an adapter trained on it
    names that folder as its base. Prompt-learning and bottleneck adapters cannot be merged: they are
    kept, frozen, on their base (a later stage of the same mode continues training them).

    ``tuning_mode="qlora"`` loads the weights quantised by bitsandbytes (``qlora``: ``tuning.qlora``).
    """
    from transformers import AutoModelForCausalLM

    from posttrain.tuning.kept import kept_adapter_kind

    if tuning_mode == "qlora":
        from posttrain.tuning.qlora import require_qlora_support

        require_qlora_support()
    name = cfg.name_or_path
    kind = kept_adapter_kind(name)
    if kind == "bottleneck":
        from posttrain.tuning.bottleneck import load_bottleneck, read_spec

        return load_bottleneck(load_model(_base_cfg(cfg, read_spec(name)["base_model_name_or_path"]), tuning_mode,
                                          qlora), name)
    if is_adapter_folder(name):
        from peft import PeftModel

        if cfg.quantize != "none":
            raise PosttrainError(
                f"model.quantize={cfg.quantize} with the adapter folder model.name_or_path={name!r}: loading merges it "
                f"into the base, and merging into quantized weights rounds it. Name its base model and continue the "
                f"adapter with tuning.lora.init_from={name!r} (what posttrain device train does)"
            )
        base = load_model(_base_cfg(cfg, adapter_base(name)), tuning_mode, qlora)
        try:
            model = PeftModel.from_pretrained(base, name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise PosttrainError(f"cannot load the adapter model.name_or_path={name!r}: {exc}") from None
        if kind is not None:
            from posttrain.tuning.prompt import align_virtual_tokens

            align_virtual_tokens(model)
            return model
        merged = model.merge_and_unload()
        merged.name_or_path = name
        return merged
    kwargs = {"dtype": resolve_dtype(cfg, tuning_mode, qlora), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if tuning_mode == "qlora":
        import os

        from posttrain.config import QloraConfig
        from posttrain.tuning.qlora import quantization_config

        kwargs["quantization_config"] = quantization_config(qlora or QloraConfig())
        # Quantised weights are placed at load time: on this process's GPU.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if cfg.quantize != "none":
        from posttrain.models.quantized import check_quantized_base

        check_quantized_base(cfg.quantize)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"cannot load model.name_or_path={name!r} ({_where(name)}): {exc}") from None
    if cfg.quantize != "none":
        from posttrain.models.quantized import quantize_base

        quantize_base(model, cfg.quantize)
    return model


def _base_cfg(cfg: ModelConfig, base: str) -> ModelConfig:
    return cfg.model_copy(update={"name_or_path": base})


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
