"""An adapter's trainable weights as a plain state dict: read, set (strictly), and start a LoRA from a saved one.

Federated rounds send these state dicts between processes; an on-device version starts from the previous one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.config import LoraConfig
from posttrain.errors import ConfigError, PosttrainError


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's state dict, without the adapter name), as CPU copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor], source: str = "the adapter") -> None:
    """Set the adapter's weights to ``state``; its names and shapes must be exactly the model's own."""
    from peft import set_peft_model_state_dict

    own = adapter_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise PosttrainError(
            f"{source} does not fit this model's adapter (same base model and tuning section?): missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
        )
    set_peft_model_state_dict(model, {k: v.to(own[k].dtype) for k, v in state.items()})


def init_lora_from(model, folder: str | Path, lora: LoraConfig) -> None:
    """Start ``model``'s fresh LoRA adapter from the weights saved in ``folder`` (``tuning.lora.init_from``).

    The saved adapter's rank, alpha and variant must be the config's: its weights mean something else otherwise.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"tuning.lora.init_from={str(folder)!r} is not a LoRA adapter folder (adapter_config.json "
                          f"and adapter_model.safetensors)")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    wanted = {"peft_type": "LORA", "r": lora.r, "lora_alpha": lora.alpha, "use_dora": lora.use_dora,
              "use_rslora": lora.use_rslora}
    # peft leaves out the variant flags it does not know; absent means off.
    differ = {k: (saved.get(k, False if k.startswith("use_") else None), v) for k, v in wanted.items()}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        shown = ", ".join(f"{k}: saved {a!r}, config {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(f"tuning.lora.init_from={str(folder)!r} was trained with other LoRA settings ({shown}); "
                          f"set tuning.lora to match it")
    load_adapter_state(model, load_file(str(weights_path)), f"tuning.lora.init_from={str(folder)!r}")
