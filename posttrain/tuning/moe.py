"""MoE-specific transforms, applied after the tuning mode: a frozen router, a chosen subset of experts.

transformers v5 fuses a layer's experts into 3D parameters (``experts.gate_up_proj`` is (E, 2I, H),
``experts.down_proj`` (E, H, I)), so one expert cannot be frozen with ``requires_grad``. Instead a
gradient hook zeroes the other experts' slices: Adam's moments of those slices then stay exactly 0
and so does their update (weight decay, which would still shrink them, is refused by the config).
"""

from __future__ import annotations

import torch

from posttrain.errors import ConfigError
from posttrain.models.moe import moe_blocks


def _module_prefixes(model, modules: list[torch.nn.Module]) -> list[str]:
    wanted = {id(m) for m in modules}
    return [f"{name}." for name, m in model.named_modules() if id(m) in wanted]


def freeze_router(model) -> int:
    """Stop every trainable parameter inside a router (its weight, or adapters peft put on it); returns how many.

    The routers are every MoE block's ``gate`` and, in Qwen2-MoE, its ``shared_expert_gate`` (the
    per-token sigmoid weight of the shared expert). peft 0.21 puts LoRA on the router of transformers-v5
    MoE models when asked for ``all-linear`` (or for ``gate``): its factors are frozen at their initial
    value (B = 0), so the router computes as its base and merging the adapter leaves its weight
    bit-identical.
    """
    routers = []
    for _, block in moe_blocks(model):
        routers.append(block.gate)
        if isinstance(getattr(block, "shared_expert_gate", None), torch.nn.Module):
            routers.append(block.shared_expert_gate)
    prefixes = _module_prefixes(model, routers)
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad and any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            n += 1
    return n


def train_only_experts(model, experts: list[int], num_experts: int) -> int:
    """Zero the gradient of every expert not in ``experts``, in each trainable fused expert parameter.

    Returns the number of parameters masked. An index beyond the model's experts, or a tuning mode that
    leaves no expert weight trainable, is a ConfigError.
    """
    bad = [e for e in experts if e >= num_experts]
    if bad:
        raise ConfigError(f"moe.train_experts={experts}: the model has {num_experts} experts (0-{num_experts - 1}); "
                          f"no expert {bad}")
    keep = torch.zeros(num_experts, dtype=torch.bool)
    keep[experts] = True
    n = 0
    for _, block in moe_blocks(model):
        for p in block.experts.parameters():
            if not p.requires_grad:
                continue
            if p.dim() == 0 or p.shape[0] != num_experts:
                raise ConfigError(f"moe.train_experts: an expert parameter of shape {tuple(p.shape)} is not "
                                  f"indexed by expert in its first dimension; this architecture is not supported")
            held = (~keep).to(p.device).view((num_experts,) + (1,) * (p.dim() - 1))
            # masked_fill, not a product: a non-finite gradient must not leak into the held slices as NaN.
            p.register_hook(lambda grad, held=held: grad.masked_fill(held, 0.0))
            n += 1
    if n == 0:
        raise ConfigError("moe.train_experts: no expert weight is trainable in this tuning mode; with "
                          "tuning.mode=freeze add the experts to tuning.freeze.train_modules (e.g. 'mlp\\.experts\\.')")
    return n
