"""Bottleneck adapters (Houlsby et al. 2019), our own small transform.

Each chosen sublayer of every transformer layer (the attention block, the MLP, or both) gets an
adapter on its output, before the layer's residual connection: ``h + up(act(down(h)))``. ``up``
starts at zero, so the adapted model starts exactly as the base; the base stays frozen.

The adapters are attached with forward hooks, so the base keeps its own modules and parameter
names; they live in one module, ``model.bottleneck_adapters``, which the optimizer, ``.to()`` and
DDP see like any other. A run saves only the adapters: ``bottleneck.safetensors`` and
``bottleneck_config.json`` (sizes, placement, and the base to load them onto). A nonlinearity sits
between the two projections, so an adapter cannot be folded into the base's weights: there is no merge.

Why not a library: ``adapters`` (AdapterHub) 1.3.0 requires transformers ~=4.57 and this project
runs on transformers 5; peft has no bottleneck adapter.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from posttrain.config import BottleneckConfig
from posttrain.errors import ConfigError, PosttrainError
from posttrain.tuning.kept import BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS

ATTRIBUTE = "bottleneck_adapters"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# Transformer blocks: "<prefix>.layers.<i>" (Llama, Qwen, Mistral), ".h.<i>" (GPT-2) or ".blocks.<i>".
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)$")
# The sublayers' names across architectures, tried in order.
_SUBLAYERS = {"attention": ("self_attn", "attn", "attention", "self_attention"),
              "mlp": ("mlp", "feed_forward", "ffn")}


class Bottleneck(nn.Module):
    """x + up(act(down(x))), computed in the adapter's dtype (float32) and returned in x's."""

    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class BottleneckAdapters(nn.Module):
    """All adapters of a model (``layers[i][place]``), its spec, and the switch ``enabled``."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.layers = nn.ModuleList(
            nn.ModuleDict({place: Bottleneck(spec["hidden_size"], spec["size"], spec["activation"])
                           for place in spec["after"]})
            for _ in spec["layers"]
        )


class _AdapterHook:
    """Applies adapter ``layers[index][place]`` to a sublayer's output (a tensor, or a tuple led by one).

    An object rather than a closure, so that a deep copy of the model calls its own copy of the adapters.
    """

    def __init__(self, holder: BottleneckAdapters, index: int, place: str):
        self.holder, self.index, self.place = holder, index, place

    def __call__(self, module, args, output):
        if not self.holder.enabled:
            return output
        adapter = self.holder.layers[self.index][self.place]
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)


def find_adapters(model) -> BottleneckAdapters | None:
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, BottleneckAdapters) else None


def _sublayer_name(layer: nn.Module, place: str) -> str | None:
    return next((name for name in _SUBLAYERS[place] if isinstance(getattr(layer, name, None), nn.Module)), None)


def make_spec(model, bc: BottleneckConfig) -> dict:
    """Where the adapters go in ``model`` and how big they are (what bottleneck_config.json records)."""
    layers = [(int(m.group(1)), name) for name, _ in model.named_modules() if (m := _LAYER.search(name))]
    if not layers:
        raise ConfigError("tuning.mode=bottleneck: found no transformer layers (modules named layers.<i>, h.<i> "
                          "or blocks.<i>) in this model")
    modules = dict(model.named_modules())
    sublayers = {}
    for place in bc.after:
        name = _sublayer_name(modules[layers[0][1]], place)
        if name is None:
            raise ConfigError(f"tuning.bottleneck.after={bc.after}: the layers of this model have no {place} "
                              f"sublayer named one of {list(_SUBLAYERS[place])}")
        sublayers[place] = name
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(config.hidden_size)
    return {
        "format": "posttrain-bottleneck",
        "version": 1,
        "base_model_name_or_path": str(getattr(model, "name_or_path", "") or ""),
        "hidden_size": hidden,
        "size": bc.size or max(1, hidden // bc.reduction_factor),
        "activation": bc.activation,
        "after": list(bc.after),
        "layers": [name for _, name in sorted(layers)],
        "sublayers": sublayers,
    }


def attach(model, spec: dict) -> BottleneckAdapters:
    """Add the adapters of ``spec`` to ``model`` (in place) and hook them in; returns them."""
    if find_adapters(model) is not None:
        raise PosttrainError("this model already has bottleneck adapters")
    modules = dict(model.named_modules())
    holder = BottleneckAdapters(spec)
    for index, layer_name in enumerate(spec["layers"]):
        layer = modules.get(layer_name)
        for place in spec["after"]:
            sublayer = getattr(layer, spec["sublayers"][place], None) if layer is not None else None
            if sublayer is None:
                raise PosttrainError(f"bottleneck adapters: the model has no {layer_name}.{spec['sublayers'][place]}; "
                                     f"they were made for another architecture")
            sublayer.register_forward_hook(_AdapterHook(holder, index, place))
    device = next(model.parameters()).device
    model.add_module(ATTRIBUTE, holder.to(device))
    return holder


def apply_bottleneck(model, cfg, task_type: str = "CAUSAL_LM"):
    """Freeze the base and add new (identity-initialised) bottleneck adapters: ``tuning.bottleneck``."""
    for p in model.parameters():
        p.requires_grad_(False)
    holder = attach(model, make_spec(model, cfg.bottleneck))
    holder.requires_grad_(True)
    return model


def continue_bottleneck(model):
    """Train further the adapters loaded from a folder (a later stage in mode bottleneck); the base stays frozen."""
    model.requires_grad_(False)
    find_adapters(model).requires_grad_(True)
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model's forward while inside (the adapters-off reference)."""
    holder = find_adapters(model)
    was = holder.enabled
    holder.enabled = False
    try:
        yield
    finally:
        holder.enabled = was


def save_bottleneck(model, folder: Path) -> None:
    from safetensors.torch import save_file

    holder = find_adapters(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in holder.state_dict().items()},
              str(folder / BOTTLENECK_WEIGHTS), metadata={"format": "pt"})
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps(holder.spec, indent=2), encoding="utf-8")


def read_spec(folder: Path) -> dict:
    path = Path(folder) / BOTTLENECK_CONFIG
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"cannot read {path}: {exc}") from None
    if spec.get("format") != "posttrain-bottleneck":
        raise PosttrainError(f"{path} is not a posttrain bottleneck adapter config")
    return spec


def load_bottleneck_weights(model, folder: Path) -> None:
    """Load saved adapter weights into ``model``'s adapters (exactly the same set of tensors)."""
    from safetensors.torch import load_file

    path = Path(folder) / BOTTLENECK_WEIGHTS
    if not path.is_file():
        raise PosttrainError(f"no bottleneck adapter weights ({BOTTLENECK_WEIGHTS}) in {folder}")
    result = find_adapters(model).load_state_dict(load_file(str(path)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PosttrainError(f"bottleneck adapters in {folder} do not fit this model: "
                             f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")


def load_bottleneck(base, folder: Path):
    """``base`` with the adapters saved in ``folder`` attached; all of it frozen."""
    attach(base, read_spec(folder))
    load_bottleneck_weights(base, folder)
    return base.requires_grad_(False)
