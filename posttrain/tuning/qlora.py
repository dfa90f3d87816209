"""QLoRA (Dettmers et al. 2023): LoRA over a base quantised at load time by bitsandbytes.

The base is quantised by transformers' ``BitsAndBytesConfig`` in ``models/load.py``; this module
checks that it can be, builds that config, and prepares the quantised model for training.
bitsandbytes is imported only through transformers, and only when the mode is used.
"""

from __future__ import annotations

import importlib.util

import torch

from posttrain.config import QloraConfig, TuningConfig
from posttrain.errors import PosttrainError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def require_qlora_support() -> None:
    """Refuse clearly where QLoRA cannot run: no CUDA device, or bitsandbytes not installed."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("this machine has no CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install 'posttrain[qlora]')")
    if missing:
        raise PosttrainError(
            f"tuning.mode=qlora needs a CUDA GPU and bitsandbytes, and {' and '.join(missing)}. "
            f"Use tuning.mode=lora to train the same adapters over an unquantised base"
        )


def compute_dtype(qcfg: QloraConfig) -> torch.dtype:
    return _DTYPES[qcfg.compute_dtype]


def quantization_config(qcfg: QloraConfig):
    """transformers' BitsAndBytesConfig for ``tuning.qlora``."""
    from transformers import BitsAndBytesConfig

    if qcfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qcfg.quant_type,
        bnb_4bit_use_double_quant=qcfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(qcfg),
    )


def apply_qlora(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    """LoRA (``tuning.lora``: DoRA, rsLoRA and embeddings included) on a base loaded quantised.

    ``prepare_model_for_kbit_training`` freezes the base and keeps its unquantised parts (norms,
    embeddings) in float32; gradient checkpointing is left to ``training.gradient_checkpointing``.
    """
    from peft import prepare_model_for_kbit_training

    from posttrain.tuning.lora import apply_lora

    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        raise PosttrainError("tuning.mode=qlora: the model was not loaded quantised; load it with "
                             "posttrain.models.load.load_model(cfg, 'qlora', qlora=...)")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_lora(model, cfg, task_type)
