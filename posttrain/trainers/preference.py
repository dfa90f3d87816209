"""Preference-shaped data: the reward model, DPO, SimPO, ORPO (pairs) and KTO (labelled examples).

One trainer for the data shape; the methods differ by the loss they look up in
``PAIR_LOSSES``. Chosen and rejected are padded into one batch and scored in a single
forward pass. Loss units are pairs (examples for KTO); every loss is returned as a sum
over them, so accumulation and data parallelism equal one big batch.

Metrics (averaged per unit): loss, rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy, logps/chosen, logps/rejected; ORPO adds nll and odds_ratio_loss,
DPO/SimPO with an NLL term add nll, KTO adds kl (its reference point z0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.config import RunConfig
from posttrain.data.collate import collate, n_targets
from posttrain.losses.dpo import dpo_loss
from posttrain.losses.kto import kto_kl, kto_loss
from posttrain.losses.nll import IGNORE_INDEX
from posttrain.losses.orpo import orpo_loss
from posttrain.losses.reward import bradley_terry_loss
from posttrain.losses.simpo import simpo_loss
from posttrain.models.logprobs import label_logps
from posttrain.trainers.loop import FILLER
from posttrain.trainers.reference import Reference, forward_inputs

# (inputs, labels) -> reference log-probs of each sequence
ScoreFn = Callable[[dict, torch.Tensor], torch.Tensor]


def _pair_metrics(chosen_rewards, rejected_rewards, pc, pr) -> dict:
    margin = chosen_rewards - rejected_rewards
    out = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margin": margin.sum(),
        "rewards/accuracy": (margin > 0).float().sum(),
    }
    if pc is not None:
        out["logps/chosen"] = pc.detach().sum()
        out["logps/rejected"] = pr.detach().sum()
    return out


def _with_nll(losses, metrics: dict, pc, nc, weight: float):
    """Add weight x the chosen answer's per-token NLL (RPO): keeps it likely while the margin grows."""
    if weight > 0:
        nll = -pc / nc
        losses = losses + weight * nll
        metrics["nll"] = nll.detach().sum()
    return losses, metrics


def _dpo(cfg: RunConfig, pc, pr, nc, nr, ref):
    d = cfg.preference.dpo
    losses, cr, rr = dpo_loss(
        pc, pr, ref[:, 0], ref[:, 1],
        beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing, smoothing=d.smoothing,
    )
    return _with_nll(losses, _pair_metrics(cr, rr, pc, pr), pc, nc, d.nll_weight)


def _simpo(cfg: RunConfig, pc, pr, nc, nr, ref):
    s = cfg.preference.simpo
    losses, cr, rr = simpo_loss(pc, pr, nc, nr, beta=s.beta, gamma=s.gamma)
    return _with_nll(losses, _pair_metrics(cr, rr, pc, pr), pc, nc, s.nll_weight)


def _orpo(cfg: RunConfig, pc, pr, nc, nr, ref):
    losses, nll, or_loss, cr, rr = orpo_loss(pc, pr, nc, nr, lam=cfg.preference.orpo.lam)
    metrics = _pair_metrics(cr, rr, pc, pr)
    metrics["nll"] = nll.detach().sum()
    metrics["odds_ratio_loss"] = or_loss.detach().sum()
    return losses, metrics


PAIR_LOSSES = {"dpo": _dpo, "simpo": _simpo, "orpo": _orpo}


class PairMethod:
    """Reward model, DPO, SimPO and ORPO on (chosen, rejected) pairs."""

    def __init__(self, cfg: RunConfig, pad_id: int, reference: Reference | None = None):
        self.cfg = cfg
        self.name = cfg.method
        self.pad_id = pad_id
        self.reference = reference
        self.chunked = cfg.training.chunked_head

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate([[r["chosen"]] for r in rows] + [[r["rejected"]] for r in rows], self.pad_id)
        batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
        if "ref" in rows[0]:
            batch["ref"] = torch.tensor([r["ref"] for r in rows], dtype=torch.float32)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return n_targets(batch["labels"])

    def reference_logps(self, score: ScoreFn, batch: dict) -> torch.Tensor:
        """(B, 2) reference log-probs of (chosen, rejected)."""
        logps = score(forward_inputs(batch), batch["labels"])
        return torch.stack(logps.chunk(2), dim=1)

    def loss(self, model, batch: dict[str, torch.Tensor]):
        if self.name == "reward":
            return self._reward_loss(model, batch)
        # The reference first: its no-grad activations are freed before the policy's graph is built.
        ref = None
        if self.reference is not None:
            ref = self.reference_logps(lambda i, lab: self.reference.logps(model, i, lab), batch)
        elif "ref" in batch:
            ref = batch["ref"]
        logps = label_logps(model, forward_inputs(batch), batch["labels"], chunked=self.chunked).sum(-1)
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        pc, pr = logps.chunk(2)
        nc, nr = n.chunk(2)
        losses, metrics = PAIR_LOSSES[self.name](self.cfg, pc, pr, nc.float(), nr.float(), ref)
        return losses.sum(), metrics

    def _reward_loss(self, model, batch):
        r = self.cfg.preference.reward
        # transformers' sequence-classification head reads the last non-padding token;
        # AutoModelForSequenceClassification scores the saved model the same way.
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        rc, rr = rewards.logits.squeeze(-1).float().chunk(2)
        # A score that ranks the rejected answer higher contradicts the label: no margin, rather than a negative one.
        margin = batch["margin"].clamp(min=0) * r.margin_scale if r.margin_from_score else None
        losses = bradley_terry_loss(rc, rr, margin, center_weight=r.center_weight)
        return losses.sum(), _pair_metrics(rc.detach(), rr.detach(), None, None)


class FeedbackMethod:
    """KTO on examples labelled desirable or undesirable.

    The reference point z0 is estimated over the *whole global batch* before its losses
    (``prepare_step``): each example's prompt with its partner's response, scored under
    the policy and the reference, with no gradient (as in the paper's implementation).
    """

    def __init__(self, cfg: RunConfig, pad_id: int, reference: Reference | None = None):
        self.cfg = cfg
        self.pad_id = pad_id
        self.reference = reference
        self.chunked = cfg.training.chunked_head

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate([[r["seq"]] for r in rows], self.pad_id)
        kl = collate([[r["kl"]] for r in rows], self.pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
        if "ref" in rows[0]:
            batch["ref"] = torch.tensor([r["ref"] for r in rows], dtype=torch.float32)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return n_targets(batch["labels"])

    def reference_logps(self, score: ScoreFn, batch: dict, columns=(0, 1)) -> torch.Tensor:
        """(B, 2) reference log-probs of (own response, mismatched pair); only ``columns`` are computed."""
        out = torch.zeros(batch["input_ids"].shape[0], 2, device=batch["input_ids"].device)
        if 0 in columns:
            out[:, 0] = score(forward_inputs(batch), batch["labels"])
        if 1 in columns:
            out[:, 1] = score(forward_inputs(batch, "kl_"), batch["kl_labels"])
        return out

    def _ref(self, model, batch: dict, column: int) -> torch.Tensor:
        if "ref" in batch:
            return batch["ref"][:, column]
        cols = self.reference_logps(lambda i, lab: self.reference.logps(model, i, lab), batch, (column,))
        return cols[:, column]

    @torch.no_grad()
    def prepare_step(self, model, batches: list[dict], global_sum) -> None:
        from posttrain.trainers.reference import unwrap

        policy = unwrap(model)
        device = next(policy.parameters()).device
        diff = count = 0.0
        for batch in batches:
            on = {k: v.to(device) for k, v in batch.items()}
            logps = label_logps(policy, forward_inputs(on, "kl_"), on["kl_labels"], chunked=self.chunked).sum(-1)
            gap = float((logps.float() - self._ref(model, on, 1)).sum())
            if FILLER in batch:  # its forwards keep sharded processes in step; it is no data
                continue
            diff += gap
            count += logps.shape[0]
        total, n = global_sum([diff, count])
        z0 = kto_kl(torch.tensor(total), n)
        for batch in batches:
            batch["kl"] = z0.reshape(1).float()

    def loss(self, model, batch: dict[str, torch.Tensor]):
        k = self.cfg.preference.kto
        ref = self._ref(model, batch, 0)  # first, as in PairMethod.loss
        logps = label_logps(model, forward_inputs(batch), batch["labels"], chunked=self.chunked).sum(-1)
        good = batch["desirable"]
        z0 = batch["kl"][0]
        losses, rewards = kto_loss(
            logps, ref, good, z0, beta=k.beta, desirable_weight=k.desirable_weight,
            undesirable_weight=k.undesirable_weight,
        )
        bad = ~good
        right_side = torch.where(good, rewards > k.beta * z0, rewards < k.beta * z0)
        lp = logps.detach()
        metrics = {
            "rewards/chosen": (rewards[good].sum(), good.sum()),
            "rewards/rejected": (rewards[bad].sum(), bad.sum()),
            "logps/chosen": (lp[good].sum(), good.sum()),
            "logps/rejected": (lp[bad].sum(), bad.sum()),
            # Whether each example sits on the side of the reference point its label asks for.
            "rewards/accuracy": right_side.float().sum(),
            "kl": (z0, 1),
        }
        return losses.sum(), metrics

    def finalize(self, metrics: dict) -> dict:
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


def make_method(cfg: RunConfig, pad_id: int, reference: Reference | None = None):
    cls = FeedbackMethod if cfg.method == "kto" else PairMethod
    return cls(cfg, pad_id, reference)
