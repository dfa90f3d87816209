"""Adapters that stay adapters when loaded (prompt learning, bottleneck): which kind a folder holds.

LoRA and IA3 outputs are merged into their base when a later stage loads them; these cannot be,
so a later stage either continues training the same adapter or is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

BOTTLENECK_CONFIG = "bottleneck_config.json"
BOTTLENECK_WEIGHTS = "bottleneck.safetensors"

PEFT_KINDS = {"PROMPT_TUNING": "prompt", "P_TUNING": "ptuning", "PREFIX_TUNING": "prefix"}
# The kind of adapter each unmergeable tuning mode trains (P-tuning v2 is prefix tuning without the projection).
MODE_KIND = {"prompt": "prompt", "ptuning": "ptuning", "prefix": "prefix", "ptuning_v2": "prefix",
             "bottleneck": "bottleneck"}


def kept_adapter_kind(path: str | Path) -> str | None:
    """"prompt", "ptuning", "prefix" or "bottleneck" for a folder holding such an adapter, else None."""
    folder = Path(path)
    if (folder / BOTTLENECK_CONFIG).is_file():
        return "bottleneck"
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return PEFT_KINDS.get(peft_type)


def check_continuation(mode: str, kind: str) -> None:
    """A stage starting from a kept adapter of ``kind`` can only continue it: refuse any other ``mode``."""
    from posttrain.errors import ConfigError

    if MODE_KIND.get(mode) != kind:
        same = " or ".join(m for m, k in MODE_KIND.items() if k == kind)
        raise ConfigError(
            f"tuning.mode={mode}: the starting model is a {kind} adapter over its base, which cannot be merged "
            f"into the base, so a later stage can only continue training it: use tuning.mode={same}, "
            f"or start from its base model"
        )
