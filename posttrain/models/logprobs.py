"""Log-probabilities of the labelled tokens under a causal LM, per token and summed per sequence."""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from posttrain.losses.nll import IGNORE_INDEX

# Elements of logits upcast at a time (64 MiB of float32), whatever the vocabulary size.
_CHUNK_ELEMENTS = 2**24


def logit_chunk_rows(vocab: int) -> int:
    """Rows of full logits that ``_TargetLogps`` upcasts at a time (also what the planner counts)."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


class _TargetLogps(torch.autograd.Function):
    """log softmax(logits[n])[targets[n]] for (N, V) logits and (N,) targets, at float32 or wider.

    Written by hand because autograd through ``logits.float().log_softmax(-1)`` keeps an (N, V)
    float32 copy alive until backward: twice the bf16 logits themselves (8 GiB for 8 x 2048
    tokens and a 128k vocabulary). Here only one chunk of rows is upcast at a time in either
    pass; backward rebuilds the softmax from the saved logits and their log-normaliser.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        rows = logit_chunk_rows(logits.size(-1))
        log_norm = torch.empty(logits.size(0), dtype=dtype, device=logits.device)
        for start in range(0, logits.size(0), rows):
            log_norm[start : start + rows] = torch.logsumexp(logits[start : start + rows].to(dtype), dim=-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(dtype)
        ctx.save_for_backward(logits, targets, log_norm)
        return picked - log_norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, log_norm = ctx.saved_tensors
        # d log p_target / d logit_j = 1[j == target] - softmax_j
        grad_logits = torch.empty_like(logits)
        rows = logit_chunk_rows(logits.size(-1))
        for start in range(0, logits.size(0), rows):
            end = start + rows
            g = grad_out[start:end].unsqueeze(-1)
            chunk = torch.exp(logits[start:end].to(log_norm.dtype) - log_norm[start:end].unsqueeze(-1)).mul_(-g)
            chunk.scatter_add_(-1, targets[start:end].unsqueeze(-1), g)
            grad_logits[start:end] = chunk
        return grad_logits, None


def per_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t+1] | tokens <= t) for every position, 0 where the label is IGNORE_INDEX.

    The token log-likelihoods of a causal LM (Radford et al. 2018, eq. 1), shifted exactly like
    ``nll_sum``: position t's logits score labels[t + 1]. Computed at float32 whatever the
    logits dtype, one chunk of rows at a time (see ``_TargetLogps``); differentiable.

    logits: (B, T, V); labels: (B, T) aligned with the inputs, IGNORE_INDEX = not scored.
    Returns (B, T - 1) float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T); "
            f"got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    batch, length, vocab = logits.shape
    # Shift the labels rather than the logits: logits[:, :-1] cannot be flattened to rows without
    # a copy of the whole tensor, while one extra (ignored) position per row costs nothing.
    targets = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1).long()
    scored = targets != IGNORE_INDEX
    logps = _TargetLogps.apply(logits.reshape(batch * length, vocab), targets.clamp(min=0).reshape(-1))
    logps = torch.where(scored, logps.view(batch, length), 0.0)
    return logps[:, :-1]


# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping (Gemma 2/3), logit scale
# (Cohere) or divisor (Granite) after the head. Others take the full-logits path.
PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmo", "olmo2", "olmoe", "phi3",
    "smollm3", "ministral",
})
# Elements of one chunk's float32 logits (256 MiB) in the chunked head; at least 64 rows per chunk.
_HEAD_CHUNK_ELEMENTS = 2**26


def head_chunk_rows(vocab: int) -> int:
    """Scored rows per chunk of the chunked LM head (also what the planner counts)."""
    return max(64, _HEAD_CHUNK_ELEMENTS // max(1, vocab))


def plain_head(model):
    """(the causal LM, its head) when the logits are plain ``head(hidden)`` and no virtual tokens are added."""
    from accelerate.utils import extract_model_from_parallel

    from posttrain.models.checkpoint import is_peft

    inner = extract_model_from_parallel(model)  # DDP, torch.compile
    if is_peft(inner):
        config = inner.peft_config.get(inner.active_adapter)
        if config is None or config.is_prompt_learning:
            return None
        inner = inner.get_base_model()
    if getattr(inner.config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = inner.get_output_embeddings()
    return (inner, head) if head is not None else None


@contextlib.contextmanager
def _head_removed(lm, head):
    """The model's forward returns its last hidden states as ``logits`` while inside."""
    lm.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        lm.set_output_embeddings(head)


def _chunk_logps(hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def label_logps(model, inputs: dict, labels: torch.Tensor, *, chunked: bool = True,
                temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[t+1] | tokens <= t) of a model on ``inputs``: (B, T-1) float32, 0 where not labelled.

    The same values as ``per_token_logps(model(**inputs).logits / temperature, labels)``. With ``chunked``
    (and an architecture in PLAIN_HEAD_TYPES, not a prompt-learning adapter) the forward stops before the LM head,
    and the head runs only on the labelled positions, a chunk of rows at a time under activation checkpointing:
    full (B, T, V) logits never exist, in the forward or the backward, and prompt and padding positions cost
    no head FLOPs. The price is a second head forward per chunk in the backward.
    """
    plain = plain_head(model) if chunked else None
    if plain is None:
        logits = model(**inputs, use_cache=False).logits
        return per_token_logps(logits / temperature if temperature != 1.0 else logits, labels)
    lm, head = plain
    with _head_removed(lm, head):
        hidden = model(**inputs, use_cache=False).logits
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    picked, wanted = hidden[:, :-1][scored], targets[scored]
    rows = head_chunk_rows(lm.config.get_text_config().vocab_size)
    # At least one chunk, empty when nothing is labelled: the result stays in the graph, so a micro-batch (or a
    # process) without trained tokens still backpropagates, with zero gradients.
    pieces = [
        checkpoint(_chunk_logps, picked[i : i + rows], wanted[i : i + rows], head, temperature, use_reentrant=False)
        for i in range(0, max(picked.size(0), 1), rows)
    ]
    flat = torch.cat(pieces)
    out = torch.zeros(targets.shape, dtype=flat.dtype, device=hidden.device)
    return out.masked_scatter(scored, flat)


def labelled_logits(model, inputs: dict, labels: torch.Tensor, *, chunked: bool = True) -> torch.Tensor:
    """The logits (N, V) at the N labelled positions, in row-major order (position t predicts labels[t + 1]).

    The same values as ``model(**inputs).logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]``. With ``chunked`` (and a
    head ``label_logps`` can split off) the forward stops before the LM head, which then runs on those positions
    only: (B, T, V) logits never exist and prompt and padding positions cost no head FLOPs. For losses that need
    the whole distribution at each trained token (distillation), so the (N, V) result itself is built, unchunked.
    """
    scored = labels[:, 1:] != IGNORE_INDEX
    plain = plain_head(model) if chunked else None
    if plain is None:
        return model(**inputs, use_cache=False).logits[:, :-1][scored]
    lm, head = plain
    with _head_removed(lm, head):
        hidden = model(**inputs, use_cache=False).logits
    return head(hidden[:, :-1][scored])
