"""Continued pretraining and SFT: next-token loss on the trained tokens of each row."""

from __future__ import annotations

import torch

from posttrain.data.collate import collate, n_targets
from posttrain.data.templates import IGNORE_INDEX
from posttrain.losses.nll import group_sums
from posttrain.models.logprobs import label_logps


class SupervisedMethod:
    """Batches of token rows; loss units are trained tokens.

    With ``tasks`` (the data's task table) it also returns, per task, ``loss/<task>`` (the mean NLL of
    that task's trained tokens, a (sum, count) pair) and ``token_share/<task>`` (its share of the
    batch's trained tokens), so sum over tasks of token_share x loss is the batch's loss. Every task is
    in every batch's metrics, present or not, so all processes report the same names.
    """

    perplexity = True

    def __init__(self, pad_id: int, tasks: list[str] | None = None, chunked: bool = True):
        self.pad_id = pad_id
        self.tasks = list(tasks or [])
        self.chunked = chunked  # training.chunked_head: the LM head only on trained positions (models/logprobs.py)

    def collate(self, rows) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return n_targets(batch["labels"])

    def loss(self, model, batch: dict[str, torch.Tensor]):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "task_ids")}
        # -log p of each trained token (Radford et al. 2018, eq. 1), 0 elsewhere; summed, as the loop requires.
        per_token = -label_logps(model, inputs, batch["labels"], chunked=self.chunked)
        if not self.tasks:
            return per_token.sum(), {}
        targets = batch["labels"][:, 1:]
        # A target token belongs to the task of the sample it is in (a sample's first token is never a target).
        groups = torch.where(targets != IGNORE_INDEX, batch["task_ids"][:, 1:], -1)
        sums, counts = group_sums(per_token.detach(), groups, len(self.tasks))
        metrics = {}
        for name, total, n in zip(self.tasks, sums.tolist(), counts.tolist()):
            metrics[f"loss/{name}"] = (total, n)
            metrics[f"token_share/{name}"] = float(n)
        return per_token.sum(), metrics
