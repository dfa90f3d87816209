"""Model FLOPs utilisation (MFU): the training FLOPs a step needs, against the device's dense bf16 peak.

The count follows Chowdhery et al. (2022, PaLM, appendix B): a matrix multiply with N weights costs 2N FLOPs per
token forward and 4N backward (gradients of the input and of the weights), and attention adds 12·L·H·T per token
(L layers, H = heads x head dim, T the context). Two refinements:

- frozen weights (LoRA, prompt tuning, freeze mode) need no weight gradient, so they cost 4N per token, not 6N;
- packed and padded batches attend within each sample only, so the attention term of a sample of n tokens is
  12·L·H·n² (n tokens, each over a context of n), summed over samples, not 12·L·H·T per token with T the row width.

- a mixture-of-experts layer runs top-k of its E experts per token, so expert weights count k/E;
- with the chunked LM head (``training.chunked_head``) the head runs on the labelled positions only, so its cost
  is charged per labelled token, not per token.

Input embeddings are a lookup, not a multiply, and are left out; a tied LM head is counted once, as the head.
Recomputation under gradient checkpointing is not counted (it is hardware FLOPs, not model FLOPs). The peak is
always the dense bf16 one, so an fp32 run (``mixed_precision: no``) shows how far it is from what bf16 could do.
"""

from __future__ import annotations

import torch

# Dense bf16 peak (FLOP/s) by device name, from the vendors' data sheets (without sparsity).
# Longer names first: "L40S" and "L40" must not match as "L4". Unlisted GPUs (e.g. A10G) log no MFU.
_PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12), ("H200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("4090", 165e12),
)


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if key in name), None)


class FlopCounter:
    """Per-token and per-sample FLOP coefficients of one model, fixed when training starts."""

    def __init__(self, model, chunked_head: bool = False):
        from posttrain.models.logprobs import plain_head

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inputs = base.get_input_embeddings()
        skip = {id(p) for p in inputs.parameters()} if inputs is not None else set()
        head = base.get_output_embeddings()
        head_params = list(head.parameters()) if head is not None else []
        # A tied head shares the embedding's weight: it is a multiply, so it counts.
        skip -= {id(p) for p in head_params}
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        active = getattr(cfg, "num_experts_per_tok", None)
        # The head's cost goes per labelled token when only labelled positions reach it (models/logprobs.py).
        head_ids = {id(p) for p in head_params} if chunked_head and plain_head(model) is not None else set()
        cost = {"body": 0.0, "head": 0.0}
        for name, p in model.named_parameters():
            if id(p) in skip:
                continue
            share = active / experts if experts and active and ".experts." in name else 1.0
            part = "head" if id(p) in head_ids else "body"
            cost[part] += (6 if p.requires_grad else 4) * p.numel() * share
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.per_token, self.per_labelled = cost["body"], cost["head"]
        self.per_square = 12 * cfg.num_hidden_layers * heads * head_dim

    def batch_flops(self, batch: dict[str, torch.Tensor], pad_id: int | None) -> float:
        """Training FLOPs of one batch: per-token cost over its real tokens, attention over each sample's length."""
        lengths = sample_lengths(batch, pad_id)
        n = lengths.sum().item()
        labelled = 0
        if self.per_labelled:
            labelled = int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else n
        return float(self.per_token * n + self.per_labelled * labelled
                     + self.per_square * (lengths.double() ** 2).sum().item())


def sample_lengths(batch: dict[str, torch.Tensor], pad_id: int | None) -> torch.Tensor:
    """Lengths of the samples in a batch: from the padding mask, or from restarting position ids (packed rows)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1)
    ids, pos = batch["input_ids"], batch.get("position_ids")
    if pos is None:
        real = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
        return real.sum(dim=1)
    # A sample starts where the position id is 0; the padding at a row's end forms its own segment.
    starts = (pos == 0).flatten().nonzero().flatten()
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()])])
    # Segments never cross rows: each row starts with position 0.
    segments = ends - starts
    real = (ids != pad_id).flatten() if pad_id is not None else torch.ones(ids.numel(), dtype=torch.bool)
    keep = real[starts]  # a segment of padding starts with a pad token
    return segments[keep]
