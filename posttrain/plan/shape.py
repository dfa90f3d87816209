"""A model's shape from its config alone, and what each tuning mode trains on it.

The model is instantiated on the ``meta`` device (shapes, no storage), so any architecture that
transformers can build is counted exactly and no weight is loaded or downloaded. Each tuning mode is
applied with posttrain's own transforms (``tuning.apply_tuning``) to a copy of that empty model, so the
trainable count is what a run would train, adapters included.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from posttrain.config import VIRTUAL_TOKEN_MODES, TuningConfig
from posttrain.errors import PosttrainError

# Decoder blocks are named "<prefix>.layers.<i>." (Llama, Qwen, Mistral), ".h.<i>." (GPT-2) or ".blocks.<i>.".
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# The modes the planner reports: posttrain's tuning modes, with DoRA (LoRA with use_dora) on its own row.
PLAN_MODES = ("full", "freeze", "lora", "dora", "qlora", "bitfit", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2",
              "bottleneck")
# Projections that read the same tensor in a Llama-style block: a LoRA without dropout keeps that input once.
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "query_key_value": "attn_in",
                 "qkv_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
                 "w1": "mlp_in", "w3": "mlp_in"}
# The attention's output projection reads the attention output, which attention keeps for backward anyway.
_READS_ATTENTION_OUTPUT = ("o_proj", "out_proj", "dense", "c_proj", "wo")


@dataclass(frozen=True)
class Architecture:
    """The numbers the memory formulas need, read from the config and the empty model."""

    name: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool
    params: int  # every parameter, tied ones once
    layer_linear_params: int  # weights of the Linear layers inside the blocks: what QLoRA quantises
    max_positions: int | None = None
    experts: int | None = None  # mixture of experts: activations are then an estimate (one expert per token)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ModeShape:
    """What one tuning mode trains on a model, and what its adapters add to the activations.

    ``adapter_saved`` and ``adapter_masks`` are elements per token per block that the adapters keep for
    backward: LoRA's dropped-out inputs and A outputs, IA3's scaled tensors, bottleneck adapters' inputs.
    """

    mode: str
    trainable: int = 0
    total: int = 0
    largest: int = 0  # elements of the largest trainable tensor
    first_trained_layer: int | None = None  # the lowest block with a trainable parameter in it
    weight_layers: int = 0  # blocks whose own weights (norms, projections) train: full, freeze
    embeddings_trained: bool = False
    head_trained: bool = False
    final_norm_trained: bool = False
    adapter_layers: int = 0
    adapter_saved: int = 0
    adapter_masks: int = 0
    transient: int = 0  # elements (fp32) a block's adapters allocate and free again within their forward
    virtual_tokens: int = 0  # in front of the input (prompt, ptuning)
    prefix_tokens: int = 0  # added to every block's keys and values (prefix, ptuning_v2)
    unavailable: str | None = None  # why the mode cannot run on this model (or machine)

    @property
    def gradient_reaches_input(self) -> bool:
        """Whether gradients flow through every block (something at or below the first block trains)."""
        return self.embeddings_trained or self.virtual_tokens > 0 or self.first_trained_layer == 0


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def read_config(name_or_path: str, trust_remote_code: bool = False):
    """transformers' config of a local folder or hub id; a clear error when there is none."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if not path.exists() and (path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1):
        raise PosttrainError(f"--model {name_or_path!r}: no such folder (a hub id is ORG/NAME)")
    where = "folder" if path.exists() else "hub id (needs network, or the model in the local HF cache)"
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PosttrainError(f"--model {name_or_path!r}: cannot read its config ({where}): {first}") from None


def empty_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise PosttrainError(f"cannot build a causal LM from this config ({type(config).__name__}): {exc}") from None


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def architecture(model: nn.Module, config, name: str) -> Architecture:
    """Read the block sizes from the config and count the parameters on the empty ``model``."""
    text = _text_config(config)
    hidden = int(_config_value(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_config_value(text, "num_attention_heads", "n_head"))
    layers = int(_config_value(text, "num_hidden_layers", "n_layer"))
    intermediate = int(_config_value(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    params = _unique_parameters(model)
    layer_linear = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and _layer_index(n + ".") is not None)
    first_block = [m for n, m in model.named_modules() if _LAYER.search(n + ".") and n.split(".")[-1].isdigit()]
    gated = False
    if first_block:
        widths = [m.out_features for m in first_block[0].modules() if isinstance(m, nn.Linear)]
        # Llama-style blocks have two projections up to the MLP width (gate, up) or one fused at twice it.
        gated = widths.count(intermediate) >= 2 or 2 * intermediate in widths
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    experts = _config_value(text, "num_local_experts", "num_experts", "n_routed_experts")
    return Architecture(
        name=name, model_type=str(getattr(text, "model_type", "?")), layers=layers, hidden=hidden,
        intermediate=intermediate, heads=heads,
        kv_heads=int(_config_value(text, "num_key_value_heads", default=heads)),
        head_dim=int(_config_value(text, "head_dim", default=hidden // heads)),
        vocab=int(text.vocab_size), tied_embeddings=tied, gated_mlp=gated,
        params=sum(p.numel() for _, p in params), layer_linear_params=layer_linear,
        max_positions=_config_value(text, "max_position_embeddings", "n_positions"),
        experts=int(experts) if experts else None,
    )


def _adapter_extras(model: nn.Module) -> tuple[int, int, int, int]:
    """(blocks with adapters, saved elements per token per block, dropout-mask elements per token per block,
    the largest transient of one adapter in elements)."""
    from posttrain.tuning.bottleneck import Bottleneck, find_adapters

    saved = masks = transient = 0
    blocks: set[int] = set()
    shared_seen: set[tuple[int, str]] = set()
    for name, module in model.named_modules():
        layer = _layer_index(name + ".")
        lora = getattr(module, "lora_A", None)
        if layer is not None and isinstance(lora, nn.ModuleDict) and len(lora):
            blocks.add(layer)
            for key in lora:
                saved += module.r[key]
                if module.use_dora.get(key):
                    # DoRA rescales the base output and the LoRA output, keeping both for the magnitude's gradient.
                    saved += 2 * module.out_features
                    # Each forward, peft forms B @ A through an in x in identity and adds it to the weight for
                    # the norm: the identity, the product, its scaled copy and the sum.
                    size_in, size_out = module.in_features, module.out_features
                    transient = max(transient, size_in * size_in + 3 * size_in * size_out)
                if not isinstance(module.lora_dropout[key], nn.Identity):
                    saved += module.in_features
                    masks += module.in_features
                    continue
                short = name.rsplit(".", 1)[-1]
                group = _SHARED_INPUT.get(short, name)
                if short in _READS_ATTENTION_OUTPUT or (layer, group) in shared_seen:
                    continue
                shared_seen.add((layer, group))
                saved += module.in_features
        elif layer is not None and hasattr(module, "ia3_l") and len(module.ia3_l):
            blocks.add(layer)
            saved += module.in_features if module.is_feedforward else module.out_features
    holder = find_adapters(model)
    if holder is not None:
        for index, places in enumerate(holder.layers):
            blocks.add(index)
            for adapter in places.values():
                if isinstance(adapter, Bottleneck):
                    saved += adapter.down.in_features + 2 * adapter.down.out_features
    n = max(len(blocks), 1)
    return len(blocks), saved // n, masks // n, transient


def mode_shape(model: nn.Module, mode: str, tuning: TuningConfig) -> ModeShape:
    """Apply ``mode`` (a posttrain tuning mode, or "dora") to a copy of the empty ``model`` and describe it."""
    from posttrain.errors import ConfigError
    from posttrain.tuning import apply_tuning

    cfg = _mode_config(mode, tuning)
    model = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            # peft and transformers warn about things that concern a real run, not an empty model being counted.
            warnings.simplefilter("ignore")
            model = apply_tuning(model, cfg)
    except (ConfigError, PosttrainError, ValueError) as exc:
        return ModeShape(mode, unavailable=str(exc).split("; ")[0])
    params = _unique_parameters(model)
    trained = [(n, p) for n, p in params if p.requires_grad]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    layers = sorted({i for n, _ in trained if (i := _layer_index(n)) is not None})
    embed_ids = {id(p) for p in embed.parameters()}
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    adapter_layers, saved, masks, transient = _adapter_extras(model)
    adapter_mode = cfg.mode not in ("full", "freeze", "bitfit")
    outside = [p for n, p in trained if _layer_index(n) is None and id(p) not in embed_ids | head_ids]
    virtual = getattr(cfg, cfg.mode).num_virtual_tokens if cfg.mode in VIRTUAL_TOKEN_MODES else 0
    prefix = cfg.prefix.num_virtual_tokens if cfg.mode in ("prefix", "ptuning_v2") else 0
    return ModeShape(
        mode=mode,
        trainable=sum(p.numel() for _, p in trained),
        total=sum(p.numel() for _, p in params),
        largest=max((p.numel() for _, p in trained), default=0),
        first_trained_layer=layers[0] if layers else (0 if prefix else None),
        weight_layers=0 if adapter_mode else len(layers),
        embeddings_trained=any(id(p) in embed_ids for _, p in trained),
        head_trained=any(id(p) in head_ids for _, p in trained),
        # Parameters outside blocks, embeddings and head: the final norm (prompt encoders are not, in adapter modes).
        final_norm_trained=bool(outside) and not adapter_mode,
        adapter_layers=adapter_layers, adapter_saved=saved, adapter_masks=masks, transient=transient,
        virtual_tokens=virtual, prefix_tokens=prefix,
    )


def _mode_config(mode: str, tuning: TuningConfig) -> TuningConfig:
    """The tuning config to count ``mode`` with: QLoRA trains exactly LoRA's matrices (its base is quantised)."""
    if mode == "dora":
        return tuning.model_copy(update={"mode": "lora", "lora": tuning.lora.model_copy(update={"use_dora": True})})
    if mode == "qlora":
        return tuning.model_copy(update={"mode": "lora"})
    return tuning.model_copy(update={"mode": mode})


def default_tuning(layers: int) -> TuningConfig:
    """posttrain's defaults for every mode; freeze trains the top quarter of the blocks (at least one)."""
    return TuningConfig(mode="full", freeze={"train_top_layers": max(1, layers // 4)})


def describe_modes(model: nn.Module, tuning: TuningConfig, modes=PLAN_MODES) -> dict[str, ModeShape]:
    shapes: dict[str, ModeShape] = {}
    for mode in modes:
        if mode == "qlora" and "lora" in shapes:
            # The same adapters as LoRA (only the base's storage differs): applying peft again would be slow.
            shapes[mode] = replace(shapes["lora"], mode="qlora")
        else:
            shapes[mode] = mode_shape(model, mode, tuning)
    return shapes

