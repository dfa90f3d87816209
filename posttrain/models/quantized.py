"""A frozen base with weight-only quantized linear layers (torchao), for LoRA on a small device.

The float model is loaded as usual and torchao's ``quantize_`` replaces the weight of every ``nn.Linear``
except the output head (tied to the input embedding in small models, and the layer most sensitive to
rounding). peft then puts its torchao-aware LoRA layers on them: gradients flow through the int8 weights
(one scale per output row) to the adapters, and the weights themselves are never updated. int4 (the CUDA
tinygemm layout; see ``export/quantize.py`` for why there is no CPU int4) has no backward, so the stage
config refuses it for training; here it only quantizes a base for inference.

The float model is loaded whole before ``quantize_``, and torchao's int8 linear keeps dequantized weights for
backward: on CPU the int8 base's peak memory is higher than the float one's (benchmarks/ondevice_memory.py).
"""

from __future__ import annotations

import importlib.util

import torch

from posttrain.errors import ConfigError, MissingExtraError


def check_quantized_base(method: str) -> None:
    """Fail before any work when ``model.quantize=method`` cannot run here."""
    if importlib.util.find_spec("torchao") is None:
        raise MissingExtraError("torchao", "ondevice", f"model.quantize={method}")
    if method == "int4" and not torch.cuda.is_available():
        raise ConfigError("model.quantize=int4 needs a CUDA GPU: torchao 0.18 has no int4 weight-only kernel for CPU. "
                          "Use model.quantize=int8 on a CPU device")


def quantize_base(model, method: str):
    """Quantize ``model``'s linear layers (not its output head) in place; returns the model."""
    from torchao.quantization import quantize_

    from posttrain.export.quantize import torchao_config

    check_quantized_base(method)
    if method == "int4":
        if model.dtype != torch.bfloat16:
            raise ConfigError(f"model.quantize=int4 needs the base in bfloat16 (model.dtype bfloat16 or auto), "
                              f"not {model.dtype}")
        model.to("cuda")
    head = model.get_output_embeddings()
    quantize_(model, torchao_config(method, model),
              filter_fn=lambda module, _name: isinstance(module, torch.nn.Linear) and module is not head)
    model.requires_grad_(False)
    return model
