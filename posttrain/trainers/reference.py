"""The reference policy of DPO and KTO: where its log-probs come from.

Three ways, one result (``tests/invariants/test_reference.py`` checks they agree):

- ``adapters_off`` (adapter modes: LoRA, QLoRA, IA3, prompt learning, bottleneck): the policy itself
  with its adapters disabled; no second model.
- ``precomputed`` (default for full, freeze, BitFit): the starting model scores every
  training and eval sequence once before training; the log-probs are cached on disk,
  keyed by the data fingerprint and a hash of the model's weights, so no second model is
  held in memory and a rerun on the same data and model skips the pass.
- ``live``: a frozen copy of the starting model, scored alongside the policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from posttrain.io import atomic_write_bytes
from posttrain.models.logprobs import label_logps
from posttrain.tuning import adapters_disabled


# Bump when the way reference log-probs are computed changes, so stale caches are never reused.
REFERENCE_VERSION = "1"


def forward_inputs(batch: dict, prefix: str = "") -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[prefix + k] for k in keys if prefix + k in batch}


def unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


class Reference:
    """Scores sequences with the reference policy: a frozen model, or the policy with adapters off."""

    def __init__(self, mode: str, model=None, chunked: bool = True):
        if mode not in ("live", "adapters_off"):
            raise ValueError(f"a Reference scores live; mode {mode!r} is handled by precomputing")
        self.mode = mode
        self.model = model
        self.chunked = chunked

    @torch.no_grad()
    def token_logps(self, policy, inputs: dict, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(B, T-1) reference log-probs of each labelled token, 0 elsewhere; ``temperature`` divides the logits."""
        model = self.model if self.mode == "live" else unwrap(policy)
        ctx = adapters_disabled(model) if self.mode == "adapters_off" else contextlib.nullcontext()
        was_training = model.training
        model.eval()  # the reference is the model without dropout
        try:
            with ctx:
                return label_logps(model, inputs, labels, chunked=self.chunked, temperature=temperature)
        finally:
            model.train(was_training)

    def logps(self, policy, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """(B,) reference log-probs of each sequence's labelled tokens."""
        return self.token_logps(policy, inputs, labels).sum(-1)


def scorer(model, chunked: bool = True):
    """A reference-logps function for precomputing: ``model`` as it is now, frozen."""

    @torch.no_grad()
    def score(inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        return label_logps(model, inputs, labels, chunked=chunked).sum(-1)

    return score


def weights_fingerprint(model) -> str:
    """A hash of the model's weights and dtypes as loaded: any change to them means new reference log-probs.

    A starting model with an adapter kept on it (a prompt-tuned or bottleneck stage's output) is
    hashed whole, adapter included: two such starts on one base have different references.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference(method, dataset, score, batch_size: int, device, autocast, progress: bool) -> np.ndarray:
    """(len(dataset), 2) reference log-probs, in batches sorted by length to pad little."""
    lengths = dataset.row_lengths()
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    out = np.zeros((len(dataset), 2), dtype=np.float32)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="reference log-probs", unit="batch", dynamic_ncols=True)
    for idx in batches:
        batch = method.collate([dataset.row(r) for r in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            cols = method.reference_logps(score, batch)
        out[idx] = cols.float().cpu().numpy()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


class _Share:
    """Every ``world``-th row of a dataset, from ``rank``: one process's part of the scoring."""

    def __init__(self, ds, rank: int, world: int):
        self.ds, self.index = ds, list(range(rank, len(ds), world))
        lengths = ds.row_lengths()
        self.lengths = [lengths[i] for i in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def row_lengths(self) -> list[int]:
        return self.lengths

    def row(self, r: int) -> dict:
        return self.ds.row(self.index[r])


def attach_precomputed(
    sets: dict, method, model, cache: Path, *, settings: str, batch_size: int, device, autocast, progress: bool, log,
    rank: int = 0, world: int = 1,
) -> None:
    """Give each dataset in ``sets`` ({"train": set, "eval": set or None}) its reference log-probs.

    Computed with ``model`` (the starting policy) unless the cache holds them for these weights
    and ``settings`` (whatever else changes the numbers: mixed precision, attention kernel).
    With several processes each scores every ``world``-th row and the parts are gathered, so no
    process idles at a barrier while another scores the whole set. Every process must call this.
    """
    import transformers

    config = model.config.to_json_string() if hasattr(model, "config") else ""
    chunked = method.chunked
    parts = [weights_fingerprint(model), settings, f"chunked_head={chunked}", config, torch.__version__, transformers.__version__,
             REFERENCE_VERSION]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
    path = cache / f"reference-{key}.npz"
    if path.is_file():
        z = np.load(path)
        if all(ds is None or (name in z and len(z[name]) == len(ds)) for name, ds in sets.items()):
            for name, ds in sets.items():
                if ds is not None:
                    ds.ref = z[name]
            log(f"reference log-probs loaded from cache {path}")
            return
    model.to(device)
    score = scorer(model, chunked)
    was_training = model.training
    model.eval()
    arrays = {}
    for name, ds in sets.items():
        if ds is None:
            continue
        share = _Share(ds, rank, world)
        mine = compute_reference(method, share, score, batch_size, device, autocast, progress)
        parts = [(share.index, mine)]
        if world > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
        full = np.zeros((len(ds), 2), dtype=np.float32)
        for index, values in parts:
            full[index] = values
        ds.ref = arrays[name] = full
    model.train(was_training)
    if rank == 0:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        log(f"reference log-probs computed once and cached in {path}")
