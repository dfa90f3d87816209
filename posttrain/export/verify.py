"""Reload-and-compare: the exported model must give the source model's logits on a few prompts.

The prompts are chat conversations rendered with the model's own template (the way it will be
served) and plain text. The reference is the source in float32 (for an adapter, the unmerged
PeftModel), so one comparison covers the merge, the dtype cast, quantization and the round trip
through the files.

How close is close enough depends on what the export changes:

- float32: nothing but the order of float operations in the merge, so the largest logit
  difference must stay below 1e-4 of the logit scale;
- float16 / bfloat16: every weight and activation is rounded (10 / 7 mantissa bits), so the
  bound is looser and the greedy (top-1) token must mostly agree;
- int8 / int4 weight-only: the weights themselves change, so single logits may move; the
  bound is on how often the greedy token agrees and on the mean KL divergence of the
  next-token distributions.

``scale`` is the largest reference logit magnitude (at least 1), which makes the float
bounds independent of how peaked a model's logits are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

PROBE_CHATS = [
    [{"role": "user", "content": "What is the largest of 4, 0, 8, 1?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."},
     {"role": "user", "content": "And back down?"}],
]
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]
MAX_PROBE_TOKENS = 64


def probe_inputs(tokenizer) -> list[list[int]]:
    """Token ids of the probe prompts: chats rendered with the template (when there is one), then plain text."""
    from jinja2 import TemplateError

    texts = []
    if getattr(tokenizer, "chat_template", None):
        for chat in PROBE_CHATS:
            try:
                texts.append((tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), False))
            except (TemplateError, ValueError):  # a template may reject a role (e.g. system): that probe is skipped
                continue
    texts += [(t, True) for t in PROBE_TEXTS]
    inputs = []
    for text, add_special in texts:
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"][:MAX_PROBE_TOKENS]
        if ids:
            inputs.append(list(ids))
    return inputs


@torch.no_grad()
def probe_logits(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits on the CPU, one [seq, vocab] tensor per prompt (one prompt at a time: no padding effects)."""
    device = next(model.parameters()).device
    out = []
    for ids in inputs:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
        out.append(logits[0].float().cpu())
    return out


@dataclass
class Comparison:
    prompts: int
    positions: int
    scale: float  # max |reference logit|, at least 1
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # share of positions whose argmax token is the same
    kl: float  # mean KL(reference || exported) of the next-token distributions, in nats

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"max |dlogit| {self.max_abs_diff:.3g} (scale {self.scale:.3g}), mean {self.mean_abs_diff:.3g}, "
                f"top-1 agreement {self.top1_agreement:.1%}, KL {self.kl:.3g} over {self.positions} positions "
                f"of {self.prompts} prompts")


def compare_logits(reference: list[torch.Tensor], exported: list[torch.Tensor]) -> Comparison:
    if len(reference) != len(exported) or any(r.shape != e.shape for r, e in zip(reference, exported)):
        raise ValueError("reference and exported logits must come from the same prompts")
    # One prompt at a time: float64 copies of [positions, vocab] stay small for 100k+ vocabularies.
    positions = elements = agree = 0
    scale, max_diff, sum_diff, sum_kl = 1.0, 0.0, 0.0, 0.0
    for r, e in zip(reference, exported):
        ref, got = r.double(), e.double()
        diff = (ref - got).abs()
        log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(got, dim=-1)
        positions += ref.shape[0]
        elements += diff.numel()
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        scale = max(scale, ref.abs().max().item())
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.sum().item()
        sum_kl += (log_p.exp() * (log_p - log_q)).sum().item()
    return Comparison(
        prompts=len(reference), positions=positions, scale=scale, max_abs_diff=max_diff,
        mean_abs_diff=sum_diff / elements, top1_agreement=agree / positions, kl=max(0.0, sum_kl / positions),
    )


@dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float | None = None  # max |dlogit| / scale
    min_top1: float | None = None
    max_kl: float | None = None

    def failures(self, c: Comparison) -> list[str]:
        out = []
        if not all(map(math.isfinite, (c.max_abs_diff, c.mean_abs_diff, c.kl))):
            return ["the exported model gives non-finite logits"]
        if self.max_rel_diff is not None and c.max_abs_diff > self.max_rel_diff * c.scale:
            out.append(f"max |dlogit| {c.max_abs_diff:.3g} > {self.max_rel_diff:g} x scale {c.scale:.3g}")
        if self.min_top1 is not None and c.top1_agreement < self.min_top1:
            out.append(f"top-1 agreement {c.top1_agreement:.1%} < {self.min_top1:.0%}")
        if self.max_kl is not None and c.kl > self.max_kl:
            out.append(f"mean KL {c.kl:.3g} > {self.max_kl:g}")
        return out

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


TOLERANCES = {
    "float32": Tolerance(max_rel_diff=1e-4),
    "float16": Tolerance(max_rel_diff=2e-2, min_top1=0.95),
    "bfloat16": Tolerance(max_rel_diff=8e-2, min_top1=0.90),
    "int8": Tolerance(min_top1=0.90, max_kl=0.05),
    "int4": Tolerance(min_top1=0.80, max_kl=0.25),
}


def tolerance_for(dtype: str, quantize: str) -> Tolerance:
    return TOLERANCES[quantize if quantize != "none" else dtype]
