"""MoE training on any of the loop's methods: router losses added to its loss, expert loads in its metrics.

``MoeMethod`` wraps a method (SFT, DPO, KTO, the reward model, ...). While the wrapped loss runs it
records the router logits of the policy's forward passes (``models/moe.py: RouterRecorder``) and adds

    aux_loss_coef * load_balancing_loss + z_loss_coef * router_z_loss      (losses/moe.py)

How the terms enter the loop's sums (the loop divides every step's sum by the global batch's units U):

- the z-loss, a mean over tokens: ``prepare_step`` counts the real tokens T of the whole global batch
  from its masks (no forward; summed over processes), and each micro-batch adds U / T times the sum
  over its own tokens, so the step gets the global batch's mean in either scope.
- ``aux_loss_scope: micro_batch``: each micro-batch's load-balancing term is over its own real tokens,
  as in transformers and most trainers, multiplied by the micro-batch's units u, so the step gets the
  u-weighted mean of the micro-batches' values. The term is a product of two means, not a sum over
  tokens, so this equals one big batch only when a step has one micro-batch on one process; with
  accumulation or DDP the split changes its value (and its gradient) slightly.
- ``aux_loss_scope: global_batch``: the expert loads f are counted over the whole global batch first
  (a no-grad, eval-mode forward of every micro-batch in ``prepare_step``, summed over processes); with f
  fixed the load-balancing term is a sum over tokens, like the z-loss, and each micro-batch adds its
  tokens' part the same way, so the step's value and gradient are exactly those of one big batch,
  whatever the accumulation or the number of processes.

Metrics (training steps only; evaluation adds no router term): ``moe/aux_loss`` and ``moe/z_loss``
(unweighted), ``moe/load/e<i>`` (expert i's share of the routed tokens, averaged over layers; 1/E is
balanced), ``moe/load_max`` / ``moe/load_min`` (the largest / smallest share of any expert in any
layer, relative to 1/E), and with ``moe.log_layer_loads`` every layer's ``moe/load/l<l>/e<i>``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from posttrain.config import ONLINE_METHODS, MoeConfig, RunConfig
from posttrain.errors import ConfigError, PosttrainError
from posttrain.losses.moe import expert_counts, load_balancing_loss, router_z_loss
from posttrain.models.moe import (
    SUPPORTED_MOE,
    MoeSpec,
    RouterRecorder,
    is_moe_config,
    moe_spec,
    prepended_virtual_tokens,
    routed_tokens,
    transformers_model,
)

_LAYER_LOAD = re.compile(r"moe/load/l(\d+)/e(\d+)")


@dataclass(frozen=True)
class _StepTotals:
    """What the router terms of a training step need from its whole global batch (all processes)."""

    fraction: torch.Tensor | None  # (L, E) expert loads f of the global batch (aux_loss_scope global_batch)
    tokens: float  # real tokens the routers see
    units: float  # the wrapped method's loss units


def _takes(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


class MoeMethod:
    """A loop method with the router losses of an MoE policy added; every other member is the wrapped method's."""

    def __init__(self, inner, recorder: RouterRecorder, spec: MoeSpec, cfg: MoeConfig, aux_loss_coef: float):
        self.inner = inner
        self.recorder = recorder
        self.spec = spec
        self.cfg = cfg
        self.aux_loss_coef = aux_loss_coef
        self._step: _StepTotals | None = None

    def __getattr__(self, name: str) -> Any:
        # Optional members the loop looks up (tokens, perplexity, ...) are the wrapped method's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def collate(self, rows):
        return self.inner.collate(rows)

    def count(self, batch) -> int:
        return self.inner.count(batch)

    def prepare_step(self, model, batches: list[dict], global_sum) -> None:
        prepare = getattr(self.inner, "prepare_step", None)
        if prepare is not None:
            prepare(model, batches, global_sum)
        self._step = None
        if not model.training:
            return
        from posttrain.trainers.reference import forward_inputs, unwrap

        policy = unwrap(model)
        units = float(sum(self.inner.count(b) for b in batches))
        if self.cfg.aux_loss_scope == "global_batch":
            counts, tokens = self._count_loads(policy, batches)
            totals = global_sum([*counts.flatten().tolist(), tokens, units])
            n_tokens, n_units = totals[-2], totals[-1]
            fraction = torch.tensor(totals[:-2], device=counts.device).view_as(counts) / max(n_tokens, 1.0)
        else:
            virtual = prepended_virtual_tokens(policy)
            tokens = sum(routed_tokens(forward_inputs(b), self.recorder.pad_id, virtual) for b in batches)
            n_tokens, n_units = global_sum([tokens, units])
            fraction = None
        self._step = _StepTotals(fraction, n_tokens, n_units)

    def _count_loads(self, policy, batches: list[dict]) -> tuple[torch.Tensor, float]:
        """(L, E) expert counts and the real tokens of these micro-batches, from a no-grad forward of each.

        Run in eval mode, so it draws no random numbers: with dropout (or Mixtral's router jitter) on, the
        training forwards then draw the same as without this count, and f is the routing without noise,
        a little unlike the noisy routing of the loss's own forward. The LM head runs on the last position
        only (``logits_to_keep``) where the model takes it: no (B, T, V) logits.
        """
        from posttrain.trainers.reference import forward_inputs

        device = next(policy.parameters()).device
        counts = torch.zeros(self.recorder.n_layers, self.spec.num_experts, device=device)
        extra = {"logits_to_keep": 1} if _takes(transformers_model(policy), "logits_to_keep") else {}
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), self.recorder.recording(grad_only=False) as forwards:
                for batch in batches:
                    policy(**{k: v.to(device) for k, v in forward_inputs(batch).items()}, use_cache=False, **extra)
        finally:
            policy.train(was_training)
        tokens = 0.0
        for fw in forwards:
            logits, mask = fw.stacked()
            counts += expert_counts(logits, self.spec.top_k, mask)
            tokens += float(mask.sum())
        return counts, tokens

    def loss(self, model, batch):
        if not model.training:
            return self.inner.loss(model, batch)
        if self._step is None:
            raise PosttrainError("MoE training: the step's token count was not taken before its loss "
                                 "(prepare_step was not called)")
        with self.recorder.recording() as forwards:
            loss, metrics = self.inner.loss(model, batch)
        if not forwards:
            raise PosttrainError("MoE training: the method's forward pass reached no router; "
                                 "the router losses cannot be computed")
        parts = [fw.stacked() for fw in forwards]
        logits = torch.cat([lg for lg, _ in parts], dim=1)
        mask = torch.cat([m for _, m in parts])
        k, step = self.spec.top_k, self._step
        # A sum over the global batch's tokens, so the micro-batches' parts add up to the whole batch's mean.
        z = step.units * router_z_loss(logits, mask, n_tokens=step.tokens)
        if step.fraction is not None:
            aux = step.units * load_balancing_loss(logits, k, mask, expert_fraction=step.fraction,
                                                   n_tokens=step.tokens)
        else:
            aux = self.inner.count(batch) * load_balancing_loss(logits, k, mask)
        if self.aux_loss_coef > 0:
            loss = loss + self.aux_loss_coef * aux
        if self.cfg.z_loss_coef > 0:
            loss = loss + self.cfg.z_loss_coef * z
        metrics = {**metrics, "moe/aux_loss": float(aux.detach()), "moe/z_loss": float(z.detach())}
        routed = float(mask.sum()) * k
        for layer, row in enumerate(expert_counts(logits, k, mask).tolist()):
            for expert, n in enumerate(row):
                metrics[f"moe/load/l{layer}/e{expert}"] = (n, routed)
        return loss, metrics

    def finalize(self, metrics: dict) -> dict:
        finalize = getattr(self.inner, "finalize", None)
        if finalize is not None:
            metrics = finalize(metrics)
        loads = {}
        for key, value in metrics.items():
            if m := _LAYER_LOAD.fullmatch(key):
                loads[int(m.group(1)), int(m.group(2))] = value
        if not loads:
            return metrics
        out = {k: v for k, v in metrics.items() if self.cfg.log_layer_loads or not _LAYER_LOAD.fullmatch(k)}
        n_experts = self.spec.num_experts
        layers = sorted({layer for layer, _ in loads})
        for e in range(n_experts):
            shares = [loads[(layer, e)] for layer in layers if (layer, e) in loads]
            if shares:
                out[f"moe/load/e{e}"] = sum(shares) / len(shares)
        out["moe/load_max"] = max(loads.values()) * n_experts
        out["moe/load_min"] = min(loads.values()) * n_experts
        return out


def _model_config(name: str):
    """The transformers config at model.name_or_path (the base under adapter folders), or None if unreadable."""
    from transformers import AutoConfig

    from posttrain.models.load import root_model

    try:
        return AutoConfig.from_pretrained(root_model(name))
    except (OSError, ValueError):
        return None  # loading the model reports it, with the reason


def _refuse_on(what: str, cfg: RunConfig) -> NoReturn:
    raise ConfigError(
        f"moe: options are set ({_changed(cfg.moe)}) but model.name_or_path={cfg.model.name_or_path!r} is {what}; "
        f"remove the moe section"
    )


def _changed(moe: MoeConfig) -> str:
    default = MoeConfig()
    return ", ".join(f"{k}={v}" for k, v in moe.model_dump().items() if v != getattr(default, k))


def check_moe_config(cfg: RunConfig) -> None:
    """Refuse moe options the model cannot take, before any data work (reads only the model's config)."""
    if cfg.moe.is_default():
        return
    config = _model_config(cfg.model.name_or_path)
    if config is None:
        return
    if not is_moe_config(config):
        _refuse_on(f"a dense model ({getattr(config, 'model_type', '?')})", cfg)
    if moe_spec(config) is None:
        _refuse_on(f"an MoE architecture ({config.model_type}) that posttrain's MoE options do not support "
                   f"(supported: {', '.join(SUPPORTED_MOE)})", cfg)


def setup_moe(cfg: RunConfig, model, method, pad_id: int | None, log=print):
    """After the tuning transform: freeze the router / experts as asked and wrap the method with the router losses.

    Returns the method to train with (unchanged for a dense model, and for the online methods, which
    compute their losses themselves).
    """
    config = transformers_model(model).config
    spec = moe_spec(config)
    if spec is None:
        if not cfg.moe.is_default():
            _refuse_on("a dense model" if not is_moe_config(config) else
                       f"an unsupported MoE architecture ({config.model_type})", cfg)
        if is_moe_config(config):
            log(f"MoE: architecture {config.model_type} is not supported by posttrain's router losses and "
                f"metrics; training without them")
        return method
    moe = cfg.moe
    if moe.freeze_router:
        from posttrain.tuning.moe import freeze_router

        n = freeze_router(model)
        log(f"MoE: routers frozen ({n} parameter tensors)" if n else
            f"MoE: moe.freeze_router: the routers have no trainable weight in tuning.mode={cfg.tuning.mode}")
    if moe.train_experts is not None:
        from posttrain.tuning.moe import train_only_experts

        n = train_only_experts(model, moe.train_experts, spec.num_experts)
        log(f"MoE: only experts {moe.train_experts} train ({n} fused expert tensors masked)")
    aux_coef = spec.aux_loss_coef if moe.aux_loss_coef is None else moe.aux_loss_coef
    if method is None or cfg.method in ONLINE_METHODS:
        log(f"MoE: {spec.num_experts} experts, top-{spec.top_k}; method {cfg.method} trains without router losses")
        return method
    recorder = RouterRecorder(model, pad_id)
    log(f"MoE: {spec.num_experts} experts, top-{spec.top_k}, {recorder.n_layers} MoE layers; load-balancing "
        f"coef {aux_coef:g} ({moe.aux_loss_scope}), z-loss coef {moe.z_loss_coef:g}")
    return MoeMethod(method, recorder, spec, moe, aux_coef)
