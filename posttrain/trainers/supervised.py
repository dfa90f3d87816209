"""Continued pretraining and SFT: next-token loss on the trained tokens of each row."""

from __future__ import annotations

import torch

from posttrain.data.collate import collate, n_targets
from posttrain.losses.nll import nll_sum


class SupervisedMethod:
    """Batches of token rows; loss units are trained tokens."""

    perplexity = True

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, rows) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return n_targets(batch["labels"])

    def loss(self, model, batch: dict[str, torch.Tensor]):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        loss, _ = nll_sum(logits, batch["labels"])
        return loss, {}
