from __future__ import annotations

from posttrain.config import TuningConfig
from posttrain.errors import ConfigError


def apply_ia3(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    """(IA)^3 (Liu et al. 2022): learned vectors rescale the chosen activations; the base stays frozen.

    Target modules default to peft's choice for the architecture (Llama: k_proj and v_proj outputs,
    and down_proj's input as the feed-forward one). The vectors start at 1 (the model unchanged) and
    merge into the weights.
    """
    from peft import IA3Config, get_peft_model

    ic = cfg.ia3
    try:
        config = IA3Config(task_type=task_type, target_modules=ic.target_modules,
                           feedforward_modules=ic.feedforward_modules)
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"tuning.mode=ia3: {exc}; set tuning.ia3.target_modules "
                          f"(and feedforward_modules) for this architecture") from None
