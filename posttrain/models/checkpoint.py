"""Save a model (or adapter) with its tokenizer, and load saved weights back into a live model."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.tuning.bottleneck import find_adapters, load_bottleneck_weights, save_bottleneck


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model(model, tokenizer, path: Path) -> None:
    """Hugging Face format: full weights, or the adapter alone for peft models; the tokenizer beside them.

    Bottleneck adapters are saved alone too (``tuning/bottleneck.py``), with the generation config.
    """
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise PosttrainError(f"refusing to save a model with non-finite weights (first: {bad[0]})")
    if find_adapters(model) is not None:
        save_bottleneck(model, path)
        model.generation_config.save_pretrained(str(path))
    else:
        model.save_pretrained(str(path))
        if is_peft(model):
            _save_prompt_encoder(model, Path(path))
    tokenizer.save_pretrained(str(path))


# A prompt encoder's full state, kept beside the adapter when peft's own file cannot restore it for training.
PROMPT_ENCODER_STATE = "prompt_encoder.safetensors"


def _reparameterised_encoder(model):
    """The prompt encoder of a prompt-learning peft model that trains more than its output vectors, else None.

    peft saves what the encoder outputs (the virtual tokens, or the prefix keys/values); with an MLP or
    LSTM in between (P-tuning, prefix tuning with projection) that cannot be loaded back for training.
    """
    config = model.active_peft_config
    if not config.is_prompt_learning or config.inference_mode:
        return None
    encoder = model.prompt_encoder[model.active_adapter]
    return encoder if set(encoder.state_dict()) != {"embedding.weight"} else None


def _save_prompt_encoder(model, path: Path) -> None:
    from safetensors.torch import save_file

    encoder = _reparameterised_encoder(model)
    if encoder is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                  str(path / PROMPT_ENCODER_STATE))


def load_weights(model, path: Path) -> None:
    """Load weights saved by ``save_model`` into ``model`` in place, checking that nothing is missed."""
    from safetensors.torch import load_file

    path = Path(path)
    if find_adapters(model) is not None:
        load_bottleneck_weights(model, path)
        return
    if is_peft(model) and _reparameterised_encoder(model) is not None:
        if not (path / PROMPT_ENCODER_STATE).is_file():
            raise PosttrainError(f"no {PROMPT_ENCODER_STATE} in {path}: the prompt encoder cannot be restored")
        model.prompt_encoder[model.active_adapter].load_state_dict(load_file(str(path / PROMPT_ENCODER_STATE)))
        return
    files = sorted(f for f in path.glob("*.safetensors") if f.name != PROMPT_ENCODER_STATE)
    if not files:
        raise PosttrainError(f"no weights (*.safetensors) in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        # A prompt-learning adapter's one tensor is loaded into the prompt encoder, outside the module's state dict.
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        if unexpected:
            raise PosttrainError(f"adapter in {path} does not fit this model: unexpected {unexpected[:3]}")
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
