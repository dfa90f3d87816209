"""Mixture-of-experts models: which architectures are supported, where their routers are, and their router logits.

transformers (v5) builds the sparse block of Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE the same way: a
module with a ``gate`` (the router: a ``(E, hidden)`` weight, softmax top-k) and ``experts`` (every
expert's weights fused into 3D parameters whose first dimension is the expert). The router returns
``(logits, top-k weights, top-k indices)``.

The training methods call the model and keep only its logits, so the router logits are taken with
forward hooks (``RouterRecorder``) rather than from ``output_router_logits=True``: the hooks see the
same tensors (tests/integration/test_moe.py checks it) whatever the method does with the outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

# Architectures whose routers are softmax top-k over a ``gate`` / ``experts`` block (checked on transformers 5.23).
SUPPORTED_MOE = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    aux_loss_coef: float  # the coefficient the model's config names (router_aux_loss_coef)


def is_moe_config(config) -> bool:
    """Whether a transformers config describes a mixture-of-experts model (supported or not)."""
    return bool(getattr(config, "num_experts_per_tok", None)) or getattr(config, "model_type", "") in SUPPORTED_MOE


def moe_spec(config) -> MoeSpec | None:
    """The routing of a supported MoE config; None for any other model (dense, or an MoE we do not support)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MOE:
        return None
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    return MoeSpec(int(experts), int(config.num_experts_per_tok),
                   float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))


def transformers_model(model):
    """The transformers model under DDP/accelerate and peft wrappers."""
    from accelerate.utils import extract_model_from_parallel

    from posttrain.models.checkpoint import is_peft

    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft(model) else model


def moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every sparse MoE block, in layer order; a block has a ``gate`` and ``experts``."""
    return [
        (name, m) for name, m in transformers_model(model).named_modules()
        if isinstance(getattr(m, "gate", None), torch.nn.Module) and isinstance(getattr(m, "experts", None),
                                                                                   torch.nn.Module)
    ]


def token_mask(kwargs: dict, pad_id: int | None) -> torch.Tensor | None:
    """Which positions of a forward pass are real tokens, flattened to (B*T,); None when every one is.

    From the attention mask when the batch has one; its leading columns beyond the inputs' length are
    cached positions (prefix tuning's virtual tokens), which the routers never see. Packed rows have none
    (transformers builds the block-diagonal mask from the restarting ``position_ids``); the padding that
    ends a packed row is then its last segment (the last position-0 onwards) when that segment holds
    nothing but ``pad_id``.
    """
    attention = kwargs.get("attention_mask")
    if attention is not None and attention.dim() == 2:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is not None:
            attention = attention[:, attention.shape[1] - inputs.shape[1]:]
        return attention.reshape(-1).to(torch.float32)
    ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
    if attention is not None or ids is None or positions is None or pad_id is None or positions.shape != ids.shape:
        return None
    mask = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
    for row in range(ids.shape[0]):
        starts = (positions[row] == 0).nonzero()
        if len(starts) == 0:
            continue
        start = int(starts[-1])
        if start > 0 and bool((ids[row, start:] == pad_id).all()):
            mask[row, start:] = 0.0
    return mask.reshape(-1)


def prepended_virtual_tokens(model) -> int:
    """Virtual tokens a prompt-learning adapter puts before every row's inputs, which the routers see.

    Prompt tuning and P-tuning prepend them to the embeddings; prefix tuning keeps them in the
    attention cache, out of the routers' way.
    """
    from accelerate.utils import extract_model_from_parallel

    from posttrain.models.checkpoint import is_peft

    model = extract_model_from_parallel(model)
    if not is_peft(model):
        return 0
    from peft import PeftType

    config = model.peft_config.get(model.active_adapter)
    if config is None or not config.is_prompt_learning or config.peft_type == PeftType.PREFIX_TUNING:
        return 0
    return int(config.num_virtual_tokens)


def routed_tokens(inputs: dict, pad_id: int | None, virtual_tokens: int = 0) -> float:
    """Real tokens the routers see in a forward of ``inputs``, known before it runs (masks only).

    ``virtual_tokens``: per row, from ``prepended_virtual_tokens``. The same count as the sum of the
    ``RoutedForward.mask`` that ``RouterRecorder`` keeps for that forward.
    """
    ids = inputs["input_ids"]
    mask = token_mask(inputs, pad_id)
    real = float(ids.numel()) if mask is None else float(mask.sum())
    return real + virtual_tokens * ids.shape[0]


@dataclass
class RoutedForward:
    """One forward pass as the routers saw it: per MoE layer (N, E) logits over its N = B*T positions."""

    mask: torch.Tensor | None  # (N,) 1 = real token; None: all real
    logits: list[torch.Tensor] = field(default_factory=list)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, N, E) logits and the (N,) mask, checked to agree."""
        logits = torch.stack(self.logits)
        n = logits.shape[1]
        mask = self.mask if self.mask is not None else torch.ones(n, device=logits.device)
        if mask.numel() != n:
            raise ValueError(f"the routers saw {n} positions but the forward's padding mask has {mask.numel()}")
        return logits, mask.to(logits.device)


class RouterRecorder:
    """Forward hooks that keep the router logits of a model's forward passes while ``recording()`` is open.

    A forward pre-hook on the decoder stack starts a record (with the padding mask of that call's
    inputs); a hook on each router appends its logits. Outside ``recording()`` the hooks do nothing,
    so backward-time recomputation (gradient checkpointing) and other forwards are not kept.
    """

    def __init__(self, model, pad_id: int | None):
        self.pad_id = pad_id
        self._forwards: list[RoutedForward] | None = None
        self._grad_only = True
        base = transformers_model(model)
        blocks = moe_blocks(base)
        if not blocks:
            raise ValueError(f"{type(base).__name__} has no MoE block (a module with `gate` and `experts`)")
        self.n_layers = len(blocks)
        stack = getattr(base, "base_model", base)
        stack.register_forward_pre_hook(self._start, with_kwargs=True)
        for _, block in blocks:
            block.gate.register_forward_hook(self._router)

    def _active(self) -> bool:
        return self._forwards is not None and (torch.is_grad_enabled() or not self._grad_only)

    def _start(self, module, args, kwargs):
        if self._active():
            inputs = dict(kwargs)
            if args:  # the decoder stack's first positional argument is input_ids
                inputs.setdefault("input_ids", args[0])
            mask = token_mask(inputs, self.pad_id)
            self._forwards.append(RoutedForward(mask))

    def _router(self, module, inputs, output):
        if self._active() and self._forwards:
            self._forwards[-1].logits.append(output[0] if isinstance(output, tuple) else output)

    @contextlib.contextmanager
    def recording(self, grad_only: bool = True):
        """Yield the list that fills with a ``RoutedForward`` per forward pass inside the block.

        ``grad_only``: keep only forwards run with gradients on, leaving out a reference model scored
        under ``no_grad`` with adapters switched off (it runs through the same routers).
        """
        self._forwards, self._grad_only = [], grad_only
        try:
            yield self._forwards
        finally:
            self._forwards = None
