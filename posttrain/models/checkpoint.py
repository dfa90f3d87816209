"""Save a model (or adapter) with its tokenizer, and load saved weights back into a live model."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.errors import PosttrainError


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model(model, tokenizer, path: Path) -> None:
    """Hugging Face format: full weights, or the adapter alone for peft models; the tokenizer beside them."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise PosttrainError(f"refusing to save a model with non-finite weights (first: {bad[0]})")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def load_weights(model, path: Path) -> None:
    """Load weights saved by ``save_model`` into ``model`` in place, checking that nothing is missed."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PosttrainError(f"no weights (*.safetensors) in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise PosttrainError(f"adapter in {path} does not fit this model: unexpected {result.unexpected_keys[:3]}")
        return
    result = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are saved once; they are loaded through their twin.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name in state}
    missing = [k for k in result.missing_keys if k not in params or id(params[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise PosttrainError(
            f"weights in {path} do not match the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
