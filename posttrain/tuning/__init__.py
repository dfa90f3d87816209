"""Tuning modes as transforms on a model: ``model = apply_tuning(model, cfg)``."""

from __future__ import annotations

from posttrain.config import LORA_MODES, PROMPT_MODES, TuningConfig
from posttrain.errors import ConfigError
from posttrain.tuning.bitfit import apply_bitfit
from posttrain.tuning.bottleneck import apply_bottleneck, continue_bottleneck, find_adapters
from posttrain.tuning.freeze import apply_freeze
from posttrain.tuning.full import apply_full
from posttrain.tuning.ia3 import apply_ia3
from posttrain.tuning.kept import PEFT_KINDS, check_continuation
from posttrain.tuning.lora import apply_lora
from posttrain.tuning.prompt import apply_prompt_learning, continue_prompt, is_prompt_learning
from posttrain.tuning.qlora import apply_qlora

TRANSFORMS = {"full": apply_full, "freeze": apply_freeze, "bitfit": apply_bitfit}
# Modes that take the task type and build their own (peft or bottleneck) model.
ADAPTER_TRANSFORMS = {"lora": apply_lora, "qlora": apply_qlora, "ia3": apply_ia3, "bottleneck": apply_bottleneck,
                      **{m: apply_prompt_learning for m in PROMPT_MODES}}


def loaded_adapter_kind(model) -> str | None:
    """The kind of an unmergeable adapter that ``load_model`` kept on ``model`` ("prompt", ..., "bottleneck")."""
    if find_adapters(model) is not None:
        return "bottleneck"
    if is_prompt_learning(model):
        peft_type = model.active_peft_config.peft_type
        return PEFT_KINDS.get(getattr(peft_type, "value", peft_type))
    return None


def apply_tuning(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    """``task_type``: "CAUSAL_LM", or "SEQ_CLS" for a reward model (its new head is always trained).

    A model loaded with an unmergeable adapter on it (a prompt-learning or bottleneck stage's output)
    continues training that adapter when ``cfg.mode`` trains the same kind; any other mode is refused.
    """
    kept = loaded_adapter_kind(model)
    if kept is not None:
        check_continuation(cfg.mode, kept)
        return continue_bottleneck(model) if kept == "bottleneck" else continue_prompt(model)
    if cfg.mode in ADAPTER_TRANSFORMS:
        model = ADAPTER_TRANSFORMS[cfg.mode](model, cfg, task_type)
        if cfg.mode in LORA_MODES and cfg.lora.init_from:
            from posttrain.tuning.weights import init_lora_from

            init_lora_from(model, cfg.lora.init_from, cfg.lora)
        return model
    model = TRANSFORMS[cfg.mode](model, cfg)
    if task_type == "SEQ_CLS":
        from posttrain.models.heads import train_head

        train_head(model)
    return model


def adapters_disabled(model):
    """A context in which ``model`` computes as its base: peft's ``disable_adapter`` or the bottleneck switch."""
    from posttrain.models.checkpoint import is_peft
    from posttrain.tuning.bottleneck import adapters_disabled as bottleneck_off

    if is_peft(model):
        return model.disable_adapter()
    if find_adapters(model) is not None:
        return bottleneck_off(model)
    raise ConfigError("preference.reference=adapters_off: the model has no adapters to switch off")


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

