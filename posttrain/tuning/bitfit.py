from __future__ import annotations

from posttrain.errors import ConfigError


def apply_bitfit(model, cfg=None):
    """BitFit (Ben Zaken et al. 2022): train only the bias terms."""
    n = 0
    for name, p in model.named_parameters():
        is_bias = name.endswith(".bias")
        p.requires_grad_(is_bias)
        n += is_bias
    if n == 0:
        raise ConfigError(
            "tuning.mode=bitfit: this model has no bias parameters (Llama-style models have none); "
            "choose tuning.mode=lora or freeze, or a model with biases (e.g. Qwen2's attention)"
        )
    return model
