"""Prompt learning through peft: prompt tuning, P-tuning (v1), prefix tuning and P-tuning v2.

- prompt (Lester et al. 2021): ``num_virtual_tokens`` trained input vectors in front of every input.
- ptuning (Liu et al. 2021): the same virtual tokens, produced by a small MLP or LSTM encoder while training.
- prefix (Li & Liang 2021): trained keys and values at every layer, reparameterised through an MLP while training.
- ptuning_v2 (Liu et al. 2022): deep prompts at every layer, i.e. peft's prefix tuning without the projection.

The base stays frozen and is never changed, so none of them can be merged into it.

Virtual tokens in front of the input (prompt, ptuning) make peft's forward return logits for
``num_virtual_tokens`` extra positions at the front. ``align_virtual_tokens`` strips them in one
place (a forward hook on the peft model), so every loss, reference and eval suite sees logits
aligned with its own input ids and labels.
"""

from __future__ import annotations

from posttrain.config import VIRTUAL_TOKEN_MODES, TuningConfig
from posttrain.errors import ConfigError, PosttrainError

_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def prompt_learning_config(model, cfg: TuningConfig, task_type: str):
    """peft's config for ``cfg.mode`` (prompt, ptuning, prefix or ptuning_v2)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if cfg.mode == "prompt":
        p = cfg.prompt
        kw = {}
        if p.init == "text":
            # peft tokenizes the text with the tokenizer saved beside the model.
            kw = {"prompt_tuning_init_text": p.init_text, "tokenizer_name_or_path": model.name_or_path}
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens,
                                  prompt_tuning_init=_INIT[p.init], **kw)
    if cfg.mode == "ptuning":
        p = cfg.ptuning
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens,
                                   encoder_reparameterization_type=p.encoder.upper(),
                                   encoder_hidden_size=p.encoder_hidden_size or _hidden_size(model))
    projection = cfg.prefix_projection()
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.prefix.num_virtual_tokens,
                              prefix_projection=projection,
                              encoder_hidden_size=cfg.prefix.encoder_hidden_size or _hidden_size(model))


def apply_prompt_learning(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, prompt_learning_config(model, cfg, task_type))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"tuning.mode={cfg.mode}: peft cannot apply it to this model: {exc}") from None
    if cfg.mode in VIRTUAL_TOKEN_MODES:
        align_virtual_tokens(peft_model)
    return peft_model


def is_prompt_learning(model) -> bool:
    from posttrain.models.checkpoint import is_peft

    return is_peft(model) and model.active_peft_config.is_prompt_learning


def has_virtual_tokens(model) -> bool:
    """Whether ``model`` puts virtual tokens in front of its input (prompt tuning, P-tuning)."""
    if not is_prompt_learning(model):
        return False
    peft_type = model.active_peft_config.peft_type
    return getattr(peft_type, "value", peft_type) in ("PROMPT_TUNING", "P_TUNING")


def _input_length(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return None if ids is None else ids.shape[1]


def _drop_position_ids(module, args, kwargs):
    """peft ignores position ids for virtual tokens (with a warning per call site): drop them here.

    Positions then count from the first virtual token, in training and in generation alike.
    A batch without an attention mask is a packed one (see data/collate.py), which cannot work.
    """
    if kwargs.get("position_ids") is not None:
        if kwargs.get("attention_mask") is None:
            raise PosttrainError("packed rows (position ids without an attention mask) cannot be used with virtual "
                                 "tokens (tuning.mode prompt or ptuning); set data.packing=false")
        kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
    return args, kwargs


def _strip_virtual_positions(module, args, kwargs, output):
    """Logits for the caller's positions only: the virtual tokens' positions at the front are dropped."""
    length = _input_length(args, kwargs)
    logits = getattr(output, "logits", None)
    if length is not None and logits is not None and logits.dim() == 3 and logits.shape[1] > length:
        output.logits = logits[:, logits.shape[1] - length :]
    return output


def align_virtual_tokens(model) -> None:
    """Make ``model(...).logits`` line up with the input ids (once per model; a no-op without virtual tokens).

    With adapters disabled (the reference) peft runs the base's forward, whose logits already line up:
    only logits longer than the input are cut.
    """
    if not has_virtual_tokens(model) or getattr(model, "_posttrain_aligned", False):
        return
    model.register_forward_pre_hook(_drop_position_ids, with_kwargs=True)
    model.register_forward_hook(_strip_virtual_positions, with_kwargs=True)
    model._posttrain_aligned = True


def continue_prompt(model):
    """Train further the prompt of an adapter loaded from a folder (a later stage of the same mode).

    peft loads prompt-learning adapters for inference only: the saved virtual tokens (or prefix
    keys/values) are the encoder's outputs, so what continues training are those vectors themselves;
    an MLP or LSTM reparameterisation is not saved and does not come back.
    """
    model.requires_grad_(False)
    model.prompt_encoder.requires_grad_(True)
    align_virtual_tokens(model)
    return model
