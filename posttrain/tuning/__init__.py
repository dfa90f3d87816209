"""Tuning modes as transforms on a model: ``model = apply_tuning(model, cfg)``."""

from __future__ import annotations

from posttrain.config import TuningConfig
from posttrain.tuning.bitfit import apply_bitfit
from posttrain.tuning.freeze import apply_freeze
from posttrain.tuning.full import apply_full
from posttrain.tuning.lora import apply_lora

TRANSFORMS = {"full": apply_full, "freeze": apply_freeze, "lora": apply_lora, "bitfit": apply_bitfit}


def apply_tuning(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    """``task_type``: "CAUSAL_LM", or "SEQ_CLS" for a reward model (its new head is always trained)."""
    if cfg.mode == "lora":
        return apply_lora(model, cfg, task_type)
    model = TRANSFORMS[cfg.mode](model, cfg)
    if task_type == "SEQ_CLS":
        from posttrain.models.heads import train_head

        train_head(model)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting tied weights once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
