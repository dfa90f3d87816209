from __future__ import annotations

import re

from posttrain.config import TuningConfig
from posttrain.errors import ConfigError

# Transformer blocks are named "<prefix>.layers.<i>." (Llama, Qwen, Mistral), ".h.<i>." (GPT-2) or ".blocks.<i>.".
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def apply_freeze(model, cfg: TuningConfig):
    """Freeze everything except the top N blocks and parameters whose names match the given regexes."""
    fc = cfg.freeze
    layer_ids = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))}
    if fc.train_top_layers is not None and fc.train_top_layers > len(layer_ids):
        raise ConfigError(
            f"tuning.freeze.train_top_layers={fc.train_top_layers}, but the model has {len(layer_ids)} layers"
        )
    first = max(layer_ids) + 1 - (fc.train_top_layers or 0) if layer_ids else 0
    patterns = [re.compile(p) for p in fc.train_modules]
    embed = {id(p) for p in model.get_input_embeddings().parameters()}
    head = {id(p) for p in model.get_output_embeddings().parameters()} if model.get_output_embeddings() else set()
    n = 0
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        train = (fc.train_top_layers and m is not None and int(m.group(1)) >= first) or any(
            pat.search(name) for pat in patterns
        )
        train = train or (fc.train_embeddings and id(p) in embed) or (fc.train_lm_head and id(p) in head)
        p.requires_grad_(bool(train))
        n += bool(train)
    if n == 0:
        raise ConfigError(f"tuning.freeze selects no parameter to train (train_modules={fc.train_modules})")
    return model
