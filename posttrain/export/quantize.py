"""Weight-only int8 / int4 quantization through torchao, saved so that transformers reloads it.

The merged float model is written to a scratch folder and loaded back through transformers
with ``TorchAoConfig``, which runs torchao's ``quantize_`` on every ``nn.Linear`` except the
output head (transformers keeps the output embedding, tied or not, in float) and, on save,
flattens torchao's tensor subclasses into safetensors. The folder then reloads with a plain
``AutoModelForCausalLM.from_pretrained`` (torchao must be installed where it is loaded).

- int8: ``Int8WeightOnlyConfig`` (one scale per output row). Runs on CPU and GPU.
- int4: ``Int4WeightOnlyConfig`` (groups of 128/64/32 input columns) in the tinygemm layout
  (``tile_packed_to_4d``), which needs bfloat16 and a CUDA GPU of compute capability 8.0+.
  In torchao 0.18 no int4 packing format runs on a CPU (plain and preshuffled need the mslk
  CUDA kernels, plain_int32 XPU/NPU, tile_packed_to_4d CUDA), so int4 is refused there.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from posttrain.errors import MissingExtraError, PosttrainError

METHODS = ("int8", "int4")
_INT4_GROUP_SIZES = (128, 64, 32)


def check_quantization(method: str) -> None:
    """Fail before any work when ``method`` cannot run here."""
    if method not in METHODS:
        raise PosttrainError(f"export: quantize must be one of none, {', '.join(METHODS)}; got {method!r}")
    if importlib.util.find_spec("torchao") is None:
        raise MissingExtraError("torchao", "export", f"--quantize {method}")
    if method == "int4" and not torch.cuda.is_available():
        raise PosttrainError(
            "export: --quantize int4 needs a CUDA GPU. torchao's int4 weight-only kernels have no CPU "
            "implementation (every Int4WeightOnlyConfig packing format needs CUDA, XPU or NPU), so an int4 model "
            "could be neither verified nor run here. Use --quantize int8 on this machine, or export int4 on a GPU"
        )


def quantize_device(method: str) -> str:
    return "cuda" if method == "int4" else "cpu"


def torchao_config(method: str, model):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    if method == "int8":
        return Int8WeightOnlyConfig()
    return Int4WeightOnlyConfig(group_size=int4_group_size(model),
                                int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)


def int4_group_size(model) -> int:
    """The largest group size that divides the input width of every linear layer (torchao skips the others)."""
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    for size in _INT4_GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise PosttrainError(
        f"export: int4 needs every linear layer's input width to be a multiple of 32; this model has "
        f"{sorted(widths)}. Use --quantize int8"
    )


def save_quantized(model, tokenizer, out_dir: Path, method: str, dtype: torch.dtype, log=print) -> dict:
    """Quantize ``model`` (float, in ``dtype``), save it with ``tokenizer`` into ``out_dir``; returns what was done."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    config = torchao_config(method, model)
    device = quantize_device(method)
    with tempfile.TemporaryDirectory(prefix=".export-unquantized-", dir=out_dir.parent) as scratch:
        model.save_pretrained(scratch)
        log(f"quantizing the linear layers to {method} with torchao {type(config).__name__}")
        quantized = AutoModelForCausalLM.from_pretrained(
            scratch, dtype=dtype, quantization_config=TorchAoConfig(config), device_map=device)
    done, kept = quantized_linears(quantized)
    if not done:
        raise PosttrainError(f"export: torchao quantized none of the linear layers to {method}")
    quantized.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    import torchao

    info = {"method": method, "torchao_config": type(config).__name__, "torchao": torchao.__version__,
            "quantized_linear_layers": len(done), "kept_in_float": kept}
    if method == "int4":
        info["group_size"] = config.group_size
    return info


def quantized_linears(model) -> tuple[list[str], list[str]]:
    """Names of the linear layers whose weight is a torchao quantized tensor, and of those left in float."""
    from torchao.utils import TorchAOBaseTensor

    done, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            (done if isinstance(module.weight, TorchAOBaseTensor) else kept).append(name)
    return done, kept
