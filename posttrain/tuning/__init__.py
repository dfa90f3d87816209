"""Tuning modes as transforms on a model: ``model = apply_tuning(model, cfg)``."""

from __future__ import annotations

from posttrain.config import TuningConfig
from posttrain.tuning.bitfit import apply_bitfit
from posttrain.tuning.freeze import apply_freeze
from posttrain.tuning.full import apply_full
from posttrain.tuning.lora import apply_lora

TRANSFORMS = {"full": apply_full, "freeze": apply_freeze, "lora": apply_lora, "bitfit": apply_bitfit}


def apply_tuning(model, cfg: TuningConfig):
    return TRANSFORMS[cfg.mode](model, cfg)


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
