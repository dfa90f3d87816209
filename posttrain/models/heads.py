"""Scalar heads on a causal LM: the reward model is transformers' sequence classifier with one label.

Using transformers' own class (not a head of ours) means the saved reward model loads with
``AutoModelForSequenceClassification`` anywhere and scores exactly as it did in training.
"""

from __future__ import annotations

from posttrain.config import ModelConfig
from posttrain.errors import PosttrainError
from posttrain.models.load import _where, is_adapter_folder, resolve_dtype
from posttrain.tuning.kept import kept_adapter_kind


def load_reward_model(cfg: ModelConfig, tuning_mode: str, pad_token_id: int):
    """A one-output sequence classifier on ``cfg``'s backbone; the head is new unless the checkpoint has one."""
    from transformers import AutoModelForSequenceClassification

    if is_adapter_folder(cfg.name_or_path) or kept_adapter_kind(cfg.name_or_path):
        raise PosttrainError(
            f"model.name_or_path={cfg.name_or_path!r} is an adapter; a reward model starts from a whole model. "
            f"Merge it first (a LoRA or IA3 adapter), or train the reward model from the adapter's base model"
        )
    kwargs = {"dtype": resolve_dtype(cfg, tuning_mode), "trust_remote_code": cfg.trust_remote_code, "num_labels": 1}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForSequenceClassification.from_pretrained(cfg.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise PosttrainError(
            f"cannot load model.name_or_path={cfg.name_or_path!r} ({_where(cfg.name_or_path)}) as a reward model: {exc}"
        ) from None
    # The head reads the last token that is not padding: it must know which id pads.
    model.config.pad_token_id = pad_token_id
    return model


def head_parameters(model) -> list[str]:
    """Names of the parameters outside the backbone (the score head)."""
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def train_head(model) -> None:
    """A new head starts random: every tuning mode trains it."""
    names = set(head_parameters(model))
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(True)


def load_value_model(cfg, pad_token_id: int):
    """PPO's value model: a one-output token classifier (a value per position), by default on the policy's start.

    ``online.ppo.value_model`` may name another start, e.g. the reward model (its backbone is loaded, the head is new).
    """
    from transformers import AutoModelForTokenClassification

    from posttrain.config import ModelConfig

    name = cfg.online.ppo.value_model or cfg.model.name_or_path
    mcfg = ModelConfig(name_or_path=name, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)
    if is_adapter_folder(name) or kept_adapter_kind(name):
        raise PosttrainError(f"online.ppo.value_model={name!r} is an adapter; give a whole model")
    kwargs = {"dtype": resolve_dtype(mcfg, "full"), "trust_remote_code": mcfg.trust_remote_code, "num_labels": 1}
    try:
        model = AutoModelForTokenClassification.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"cannot load the value model {name!r} ({_where(name)}): {exc}") from None
    model.config.pad_token_id = pad_token_id
    return model
