"""A client's side of a round, free of Flower: local training from the global adapter, and local evaluation.

A round is an ordinary run of our training loop (``trainers/loop.py``) on the client's own files, with the
adapter's weights set to the global ones first. Only the adapter's state dict leaves this module.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from posttrain.federated.config import ClientSpec, client_run_config
from posttrain.trainers.supervised import SupervisedMethod
from posttrain.tuning.weights import adapter_state, load_adapter_state


def adapter_model(cfg):
    """The base model of a stage config with its (freshly initialised) adapter on it."""
    from posttrain.models.load import load_model
    from posttrain.tuning import apply_tuning

    model = load_model(cfg.model, cfg.tuning.mode, qlora=cfg.tuning.qlora)
    return apply_tuning(model, cfg.tuning)


@torch.no_grad()
def held_out_loss(model, dataset, pad_id: int, batch_size: int, device, chunked: bool = True) -> float | None:
    """Mean next-token NLL per trained token of ``dataset`` (None without one); the model's mode is restored."""
    if dataset is None or len(dataset) == 0:
        return None
    method = SupervisedMethod(pad_id, chunked=chunked)
    was_training = model.training
    model.eval()
    total = units = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = method.collate([dataset.row(r) for r in range(start, min(start + batch_size, len(dataset)))])
        units += method.count(batch)
        loss, _ = method.loss(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss)
    model.train(was_training)
    return total / max(units, 1.0)


def _round_config(recipe: dict, spec: ClientSpec, workspace: Path, name: str, server_round: int,
                  proximal_mu: float = 0.0):
    """The client's stage config, and the round's: other batches, and FedProx's term when ``proximal_mu`` > 0.

    The data seed stays the recipe's (same split and cache every round). FedProx's local objective (Li et al.
    2020, "Federated Optimization in Heterogeneous Networks", eq. 2) is F_k(w) + mu/2 ||w - w^t||^2 with w^t the
    received global weights: the loop's ``training.l2_to_start`` (``losses/l2sp.py``), whose anchor the Trainer
    takes after ``prepare``, once the global adapter is loaded.
    """
    seed = int(recipe.get("training", {}).get("seed", 42))
    run_dir = workspace / "rounds" / name
    if run_dir.exists():  # a round the server sent again (after a timeout) starts over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = client_run_config(recipe, spec, workspace, run_dir, seed)
    # Each round draws other batches from the client's data.
    training = cfg.training.model_copy(update={"seed": seed + server_round, "l2_to_start": proximal_mu})
    return cfg, cfg.model_copy(update={"training": training})


def _prepare(cfg, log):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from posttrain.data.dataset import build_datasets
    from posttrain.data.templates import resolve_chat_template
    from posttrain.models.load import load_tokenizer

    acc = Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.method != "pretrain":
        resolve_chat_template(tokenizer, cfg.model.chat_template)
    train_set, eval_set, report, _ = build_datasets(cfg.data, tokenizer, cfg.method, cfg.training.seed,
                                                    log=lambda *a, **k: None)
    log(report.format())
    return acc, tokenizer, train_set, eval_set


def local_round(recipe: dict, spec: ClientSpec, workspace: Path, server_round: int,
                global_state: dict[str, torch.Tensor], proximal_mu: float = 0.0, log=print):
    """Train the client's adapter for one round from ``global_state``; returns (new state, report).

    The report holds the client's example count (its FedAvg weight before ``spec.weight``), the round's mean
    training loss (the NLL; FedProx's term is logged apart as ``l2_penalty``), and the held-out loss of the
    received global adapter (``eval_loss_before``: the previous round's global model on this client's data) and
    of the locally trained one (``eval_loss_after``), both by the Trainer's own evaluation.
    """
    from posttrain.trainers.loop import Trainer

    cfg, round_cfg = _round_config(recipe, spec, workspace, f"round-{server_round}", server_round, proximal_mu)
    acc, tokenizer, train_set, eval_set = _prepare(cfg, log)
    model = adapter_model(cfg)
    load_adapter_state(model, global_state, "the global adapter")
    method = SupervisedMethod(tokenizer.pad_token_id, chunked=round_cfg.training.chunked_head)
    trainer = Trainer(round_cfg, acc, model, tokenizer, method, train_set, eval_set, log=log)
    has_eval = eval_set is not None and len(eval_set) > 0
    before = trainer.evaluate()["eval_loss"] if has_eval else None
    trainer.fit()
    after = trainer.evaluate()["eval_loss"] if has_eval else None
    # FedAvg's n_k counts examples: with data.packing a training row joins several.
    report = {"client": spec.name, "examples": len(train_set.input_ids), "steps": trainer.state.step,
              "train_loss": _mean_loss(Path(round_cfg.output_dir) / "metrics.jsonl"),
              "eval_loss_before": before, "eval_loss_after": after}
    return adapter_state(acc.unwrap_model(trainer.model)), report


def local_eval(recipe: dict, spec: ClientSpec, workspace: Path, global_state: dict[str, torch.Tensor], log=print):
    """The held-out loss of ``global_state`` on the client's own eval data (the final round's per-client eval)."""
    cfg, _ = _round_config(recipe, spec, workspace, "eval", 0)
    acc, tokenizer, _, eval_set = _prepare(cfg, log)
    model = adapter_model(cfg).to(acc.device)
    load_adapter_state(model, global_state, "the global adapter")
    loss = held_out_loss(model, eval_set, tokenizer.pad_token_id, cfg.training.batch_size, acc.device,
                         cfg.training.chunked_head)
    return {"client": spec.name, "eval_examples": len(eval_set) if eval_set is not None else 0, "eval_loss": loss}


def _mean_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    values = [json.loads(line).get("loss") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None
