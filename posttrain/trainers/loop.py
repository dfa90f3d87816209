"""The one training loop: steps, accumulation, checkpoints, resume, eval, logging.

A method plugs in through ``Method``: it turns rows into batches, counts each
batch's loss units (trained tokens, pairs, ...) before the forward pass, and
returns the *sum* of its loss over those units. The loop divides by the units of
the whole global batch (all micro-batches, all processes), so gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from posttrain.config import RunConfig
from posttrain.data.collate import epoch_plan, split_global_batch
from posttrain.data.mixing import make_sampler
from posttrain.errors import MissingExtraError, PosttrainError
from posttrain.io import atomic_dir, atomic_write_text
from posttrain.losses.l2sp import l2_to_start
from posttrain.models.checkpoint import save_model
from posttrain.trainers.flops import FlopCounter, peak_bf16_flops
from posttrain.trainers.parallel import Strategy, shared_atomic_dir


class Method(Protocol):
    """What a training method supplies to the loop.

    Optional members, looked up with getattr:
    - ``tokens(batch) -> int``: trained tokens, for throughput (default: ``count``);
    - ``prepare_step(model, batches, global_sum)``: called with every micro-batch of a step
      (or every eval batch) before any loss, for statistics over the whole global batch
      (KTO's reference point); ``global_sum(list[float]) -> list[float]`` sums over processes.
      A batch holding the ``FILLER`` key only keeps sharded processes in step: run its forwards,
      count nothing of it;
    - ``finalize(metrics) -> metrics``: derived metrics from the averaged ones;
    - ``perplexity``: True when eval_loss is a per-token NLL (eval_ppl is then logged).
    """

    def collate(self, rows: list[Any]) -> dict[str, torch.Tensor]: ...

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(sum of the loss over the batch's units, metrics).

        A metric is a sum over the batch's units (averaged over the units of the global batch),
        or a (sum, count) pair for a metric over a subset (e.g. KTO's desirable examples).
        """
        ...


def _sum_count(value: Any) -> tuple[float, float | None]:
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), None


class _MetricSums:
    """Sums of metrics over micro-batches, then over processes; averaged per unit or per own count."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float | None] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            total, count = _sum_count(v)
            self.sums[k] = self.sums.get(k, 0.0) + total
            if count is not None:
                self.counts[k] = (self.counts.get(k) or 0.0) + count
            else:
                self.counts.setdefault(k, None)

    def align(self, world: int) -> None:
        """Give every process the same metric names in the same order, so their sums can be reduced.

        Needed for evaluation, where a process may have no batch (and so no metric names) at all.
        """
        mine = [(k, self.counts[k] is not None) for k in self.sums]
        if world > 1:
            from accelerate.utils import gather_object

            mine = gather_object([mine])
            mine = [kv for part in mine for kv in part]
        names = dict(mine)
        self.sums = {k: self.sums.get(k, 0.0) for k in sorted(names)}
        self.counts = {k: (self.counts.get(k) or 0.0) if names[k] else None for k in sorted(names)}

    def flat(self) -> list[float]:
        return [*self.sums.values(), *(c or 0.0 for c in self.counts.values())]

    def means(self, reduced: list[float], units: float) -> dict[str, float]:
        n = len(self.sums)
        sums, counts = reduced[:n], reduced[n:]
        out = {}
        for (k, own), total, count in zip(self.counts.items(), sums, counts):
            if own is None:
                out[k] = total / max(units, 1)
            elif count > 0:  # a subset that is empty in this batch has no mean
                out[k] = total / count
        return out


def gather_lists(items: list, world: int) -> list:
    """Every process's ``items`` (picklable), concatenated in process order; the list itself with one process.

    A collective: every process must call it, each with its own list (possibly empty).
    """
    if world == 1:
        return items
    from accelerate.utils import gather_object

    return [x for part in gather_object([items]) for x in part]


# Marks an eval batch that a process with fewer batches repeats under sharded weights (see Method.prepare_step).
FILLER = "_filler"


class NonFiniteLoss(PosttrainError):
    pass


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    # The logging window in progress, so a resumed run logs the same averages.
    window: dict[str, Any] = field(default_factory=dict)


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _param_groups(model, weight_decay: float) -> list[dict]:
    # Decay matrices only: decaying biases and norm gains pulls them toward 0 for no benefit.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    updates_per_step = 1

    def __init__(self, cfg: RunConfig, accelerator, model, tokenizer, method: Method, train_set, eval_set, log=print,
                 strategy=None):
        self.cfg, self.tcfg = cfg, cfg.training
        self.acc = accelerator
        # One process / DDP, FSDP2 or DeepSpeed (trainers/parallel.py).
        self.strategy = strategy if strategy is not None else Strategy(cfg, accelerator)
        self.tokenizer = tokenizer
        self.method = method
        self.train_set, self.eval_set = train_set, eval_set
        self.log = log
        self.step_hooks: list = []  # callables step -> metrics dict, run after each step (e.g. eval.every_steps)
        self.out = Path(cfg.output_dir)
        self.world = accelerator.num_processes
        self.global_batch = self.tcfg.batch_size * self.tcfg.gradient_accumulation_steps * self.world
        self.lengths = train_set.row_lengths()
        # data.mixing / data.replay choose each epoch's rows by task; without them every row comes once.
        self.sampler = None
        if cfg.data.mixing is not None or cfg.data.replay is not None:
            self.sampler = make_sampler(cfg.data, train_set.row_tasks(), train_set.task_names, self.tcfg.seed)
            log(f"data mixing: {self.sampler.describe()}")
        rows = self.sampler.rows_per_epoch if self.sampler is not None else len(train_set)
        self.steps_per_epoch = rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise PosttrainError(
                f"the training set has {rows} rows, fewer than one global batch of {self.global_batch} "
                f"(training.batch_size x gradient_accumulation_steps x processes); lower the batch size or add data"
            )
        self.total_steps = self.tcfg.max_steps or math.ceil(self.tcfg.epochs * self.steps_per_epoch)
        self.state = TrainState()

        if self.tcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Model FLOPs utilisation is logged where the device's peak is known (GPUs; see trainers/flops.py).
        self.peak_flops = peak_bf16_flops(accelerator.device)
        self.flops = FlopCounter(model, self.tcfg.chunked_head) if self.peak_flops else None

        def make_optimizer(wrapped):  # built on the parameters the strategy trains (FSDP's are shards)
            return torch.optim.AdamW(
                _param_groups(wrapped, self.tcfg.weight_decay),
                lr=self.tcfg.learning_rate,
                betas=(self.tcfg.adam_beta1, self.tcfg.adam_beta2),
                eps=self.tcfg.adam_eps,
            )

        self.model, self.optimizer, optimizer = self.strategy.prepare(model, make_optimizer)
        # Online methods make several optimizer updates per step (one rollout batch).
        updates = self.updates_per_step
        warmup = (self.tcfg.warmup_steps or round(self.tcfg.warmup_ratio * self.total_steps)) * updates
        # Stepped by us once per optimizer update, so it is not handed to accelerate.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(self.tcfg.lr_scheduler, warmup, self.total_steps * updates)
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # training.l2_to_start's anchor: taken here, before a resume loads later weights; checkpoints keep it,
        # since an adapter's random init (LoRA's A) is redrawn on resume from whatever the RNG then holds.
        self.start_values = [p.detach().clone() for p in self.trainable] if self.tcfg.l2_to_start > 0 else None
        self.writers = _Writers(self.out, self.tcfg.report_to, accelerator.is_main_process, cfg)

    # ---- the loop -----------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict:
        if resume:
            self._resume()
        status = "completed"
        bar = None
        if self.acc.is_main_process and self.tcfg.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
        if self.state.step == 0 and self.eval_set is not None and self.tcfg.eval_steps:
            # The baseline every later evaluation is compared with.
            self._write_metrics(self.evaluate())
        try:
            while self.state.step < self.total_steps:
                epoch, index = divmod(self.state.step, self.steps_per_epoch)
                record = self._train_step(self._epoch_plan(epoch)[index])
                self.state.step += 1
                step = self.state.step
                if bar is not None:
                    bar.update(1)
                    if "loss" in self.state.window:
                        total, n = self.state.window["loss"]
                        bar.set_postfix(loss=f"{total / n:.4f}")
                if step % self.tcfg.logging_steps == 0 or step == self.total_steps:
                    record.update(self._close_window())
                stop = False
                if self.eval_set is not None and self.tcfg.eval_steps and (
                    step % self.tcfg.eval_steps == 0 or step == self.total_steps
                ):
                    record.update(self.evaluate())
                    stop = self._track_best(record["eval_loss"])
                for hook in self.step_hooks:
                    record.update(hook(step))
                if len(record) > 0:
                    self._write_metrics(record)
                if self.tcfg.save_steps and step % self.tcfg.save_steps == 0 and step < self.total_steps:
                    self.save_checkpoint()
                if stop:
                    status = "early_stopped"
                    self.log(f"early stopping at step {step}: eval loss did not improve for "
                             f"{self.tcfg.early_stopping_patience} evaluations (best {self.state.best_eval:.4f} "
                             f"at step {self.state.best_step})")
                    break
        finally:
            if bar is not None:
                bar.close()
            self.writers.close()
        return {"status": status, "steps": self.state.step}

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if self.sampler is not None:
            return self.sampler.plan(self.lengths, self.global_batch, epoch, self.tcfg.group_by_length)
        return epoch_plan(self.lengths, self.global_batch, epoch, self.tcfg.seed, self.tcfg.group_by_length)

    def _micro_batches(self, global_batch: list[int]) -> list[dict[str, torch.Tensor]]:
        parts = split_global_batch(
            global_batch, self.lengths, self.tcfg.gradient_accumulation_steps, self.world, self.acc.process_index
        )
        return [self.method.collate([self.train_set.row(r) for r in part]) for part in parts]

    def _global_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t.tolist()

    def _train_step(self, global_batch: list[int]) -> dict:
        started = time.perf_counter()
        self.model.train()
        micro = self._micro_batches(global_batch)
        counts = [self.method.count(b) for b in micro]
        (global_units,) = self._global_sum([float(sum(counts))])
        if global_units == 0:
            raise PosttrainError("a global batch has no trained tokens; check the data report")
        prepare = getattr(self.method, "prepare_step", None)
        if prepare is not None:
            with self.acc.autocast():
                prepare(self.model, micro, self._global_sum)
        loss_sum = 0.0
        tokens = sum(self._tokens(b) for b in micro)
        if self.flops is not None:
            pad = self.tokenizer.pad_token_id
            self.state.window["flops"] = self.state.window.get("flops", 0.0) + sum(
                self.flops.batch_flops(b, pad) for b in micro)
        metric_sums = _MetricSums()
        for j, batch in enumerate(micro):
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            last = j == len(micro) - 1
            with self.strategy.no_sync(self.model, last), self.acc.autocast():
                loss, metrics = self.method.loss(self.model, batch)
                # DDP, FSDP and ZeRO average gradients over processes, hence the world-size factor.
                self.strategy.backward(self.model, loss * (self.world / global_units), last)
            loss_sum += float(loss.detach())
            metric_sums.add(metrics)
        totals = self._global_sum([loss_sum, float(tokens), *metric_sums.flat()])
        step_metrics = metric_sums.means(totals[2:], global_units)
        return self._apply_update(totals[0] / global_units, step_metrics, totals[1], started)

    def _apply_update(self, step_loss: float, step_metrics: dict, global_tokens: float, started: float) -> dict:
        """Clip, check and apply the accumulated gradients as one optimizer step; add it to the logging window."""
        if self.start_values is not None:
            step_metrics = {**step_metrics, **self._pull_to_start()}
        grad_norm = self._grad_norm()
        if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
            self.strategy.zero_grad(self.model, self.optimizer)
            what = f"loss={step_loss}, grad_norm={grad_norm} at step {self.state.step + 1}"
            if self.tcfg.nan_policy == "stop":
                raise NonFiniteLoss(
                    f"non-finite {what}; the run stopped and no model was written as final. "
                    f"Lower training.learning_rate, use bf16 instead of fp16, or set training.nan_policy=skip. "
                    f"The last good checkpoint (if any) is in {self.out / 'checkpoints'}"
                )
            self.state.skipped_steps += 1
            self.log(f"skipped a step with non-finite {what}")
            self.scheduler.step()
            return {"skipped_steps": self.state.skipped_steps}
        self.strategy.optimizer_step(self.model, self.optimizer)
        self.scheduler.step()
        self.strategy.zero_grad(self.model, self.optimizer)
        self.state.tokens += int(global_tokens)
        w = self.state.window
        w["n"] = w.get("n", 0) + 1
        w["tokens"] = w.get("tokens", 0) + global_tokens
        w["time"] = w.get("time", 0.0) + time.perf_counter() - started
        # Each metric is averaged over the steps that had it (a subset metric may be absent from a step).
        for k, v in {"loss": step_loss, "grad_norm": grad_norm, **step_metrics}.items():
            total, n = w.get(k, (0.0, 0))
            w[k] = (total + v, n + 1)
        return {}

    def _pull_to_start(self) -> dict:
        """Add the gradient of training.l2_to_start's penalty to the accumulated gradients; log its value.

        The gradients hold d(loss)/d(theta) of the global batch's mean loss, already averaged over processes,
        so adding the penalty's own gradient here, once per optimizer update and identically on every
        process, minimises loss + penalty whatever the accumulation or the number of processes.
        """
        live = [p.detach().requires_grad_(True) for p in self.trainable]
        with torch.enable_grad():
            penalty = l2_to_start(live, self.start_values, self.tcfg.l2_to_start)
            grads = torch.autograd.grad(penalty, live)
        # fp16 gradients stay multiplied by the loss scale until clipping unscales them.
        scale = self.acc.scaler.get_scale() if self.acc.scaler is not None else 1.0
        for p, g in zip(self.trainable, grads):
            g = (g * scale).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        value = float(penalty.detach())
        return {"l2_penalty": value, "l2_distance": math.sqrt(2.0 * value / self.tcfg.l2_to_start)}

    def _tokens(self, batch: dict[str, torch.Tensor]) -> int:
        tokens = getattr(self.method, "tokens", None)
        return tokens(batch) if tokens is not None else self.method.count(batch)

    def _grad_norm(self) -> float:
        return self.strategy.clip_grad_norm(self.model, self.trainable, self.tcfg.max_grad_norm)

    def _close_window(self) -> dict:
        w, self.state.window = self.state.window, {}
        if not w.get("n"):
            return {}
        w.pop("n")
        tokens, elapsed, flops = w.pop("tokens"), w.pop("time"), w.pop("flops", None)
        rec = self._finalize({k: total / n for k, (total, n) in w.items()})
        if flops is not None and elapsed > 0:
            rec["mfu"] = flops / elapsed / self.peak_flops
        rec["lr"] = self.scheduler.get_last_lr()[0]
        rec["tokens"] = self.state.tokens
        rec["tokens_per_sec"] = tokens / elapsed if elapsed > 0 else None
        return rec

    def _finalize(self, metrics: dict) -> dict:
        finalize = getattr(self.method, "finalize", None)
        return finalize(metrics) if finalize is not None else metrics

    def _write_metrics(self, record: dict) -> None:
        step = self.state.step
        full = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), **record}
        self.writers.write(full)

    # ---- evaluation -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.strategy.unwrap(self.model)
        was_training = model.training
        model.eval()
        lengths = self.eval_set.row_lengths()
        order = sorted(range(len(self.eval_set)), key=lambda i: -lengths[i])
        bs = self.tcfg.batch_size
        every = [order[i : i + bs] for i in range(0, len(order), bs)]
        mine = every[self.acc.process_index :: self.world]
        batches = [self.method.collate([self.eval_set.row(r) for r in idx]) for idx in mine]
        # Sharded weights need every process in every forward: one with fewer batches repeats one, uncounted.
        padding = -(-len(every) // self.world) - len(mine) if self.strategy.shards_params else 0
        fillers = []
        if padding > 0:
            filler = {**self.method.collate([self.eval_set.row(r) for r in every[0]]), FILLER: torch.ones(1)}
            fillers = [filler] * padding
        prepare = getattr(self.method, "prepare_step", None)
        if prepare is not None:
            with self.acc.autocast():
                prepare(model, batches + fillers, self._global_sum)
        loss_sum = units = 0.0
        metric_sums = _MetricSums()
        for j, batch in enumerate(batches + fillers):
            counted = j < len(batches)
            if counted:
                units += self.method.count(batch)
            batch = {k: v.to(self.acc.device) for k, v in batch.items() if k != FILLER}
            with self.acc.autocast():
                loss, metrics = self.method.loss(model, batch)
            if counted:
                loss_sum += float(loss)
                metric_sums.add(metrics)
        # Every process takes part in the reduction, even one with no eval batch of its own.
        metric_sums.align(self.world)
        totals = self._global_sum([loss_sum, units, *metric_sums.flat()])
        model.train(was_training)
        eval_loss = totals[0] / max(totals[1], 1)
        out = {"eval_loss": eval_loss}
        if getattr(self.method, "perplexity", False):
            out["eval_ppl"] = math.exp(min(eval_loss, 50.0))
        means = self._finalize(metric_sums.means(totals[2:], totals[1]))
        out.update({f"eval_{k}": v for k, v in means.items()})
        return out

    def _track_best(self, eval_loss: float) -> bool:
        """Record an evaluation; save the best; True when early stopping says stop."""
        s = self.state
        if s.best_eval is None or eval_loss < s.best_eval:
            s.best_eval, s.best_step, s.evals_without_improvement = eval_loss, s.step, 0
            if self.tcfg.early_stopping_patience is not None and s.step < self.total_steps:
                self.save_checkpoint()
            return False
        s.evals_without_improvement += 1
        patience = self.tcfg.early_stopping_patience
        return patience is not None and s.evals_without_improvement >= patience

    # ---- checkpoints --------------------------------------------------------------------

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        step = self.state.step
        path = self.ckpt_root / f"step-{step}"
        rng = [_rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        strategy = self.strategy
        # Under FSDP / ZeRO every process writes its shards; otherwise the main process writes alone.
        folder = shared_atomic_dir(path, self.acc) if strategy.shards_state else _main_only_dir(path, self.acc)
        with folder as tmp:
            whole = not strategy.shards_state or self.cfg.distributed.checkpoint == "full"
            full = strategy.full_model(self.model) if whole else None  # a collective when sharded
            if full is not None:
                save_model(full, self.tokenizer, tmp / "model")
            del full
            strategy.save_state(self.model, self.optimizer, tmp)
            if self.acc.is_main_process:
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng, tmp / "rng.pt")
                self._save_extra(tmp)
                if self.start_values is not None:
                    torch.save([v.cpu() for v in self.start_values], tmp / "l2_anchor.pt")
                # Written last inside the folder; the folder itself appears only when whole.
                atomic_write_text(tmp / "trainer_state.json", json.dumps(asdict(self.state), indent=2))
        if self.acc.is_main_process:
            self._rotate_checkpoints()
        self.acc.wait_for_everyone()
        return path

    def _save_extra(self, folder: Path) -> None:
        """What a subclass trains besides the policy (PPO's value model) goes into the checkpoint here."""

    def _load_extra(self, folder: Path) -> None:
        """Counterpart of ``_save_extra`` on resume."""

    def _checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.ckpt_root)

    def _rotate_checkpoints(self) -> None:
        limit = self.tcfg.save_total_limit
        if limit is None:
            return
        ckpts = [(s, p) for s, p in self._checkpoints() if s != self.state.best_step]
        keep = limit - 1 if self.state.best_step is not None else limit
        for _, p in ckpts[: max(0, len(ckpts) - max(keep, 1))]:
            shutil.rmtree(p, ignore_errors=True)

    def _resume(self) -> None:
        ckpts = self._checkpoints()
        if not ckpts:
            self.log(f"--resume: no checkpoint in {self.ckpt_root}; starting from the beginning")
            return
        step, path = ckpts[-1]
        self.strategy.load_state(self.model, self.optimizer, path)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        self._load_extra(path)
        if self.start_values is not None and (path / "l2_anchor.pt").is_file():
            saved = torch.load(path / "l2_anchor.pt", map_location="cpu", weights_only=True)
            for v, s in zip(self.start_values, saved, strict=True):
                v.copy_(s)
        rng = torch.load(path / "rng.pt", weights_only=False)
        _set_rng_state(rng[self.acc.process_index] if len(rng) == self.world else rng[0])
        self.state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        if self.acc.is_main_process:
            self.writers.truncate_after(step)
        self.acc.wait_for_everyone()
        self.log(f"resumed from {path} (step {step} of {self.total_steps})")

    def load_best(self) -> bool:
        """Put the best checkpoint's weights into the model (early stopping runs end on the best)."""
        best = self.state.best_step
        path = self.ckpt_root / f"step-{best}"
        if best is None or best == self.state.step or not path.is_dir():
            return False
        self.strategy.load_model(self.model, path)
        return True


@contextlib.contextmanager
def _main_only_dir(path: Path, acc):
    """``atomic_dir`` on the main process; a scratch value elsewhere (nothing is written there)."""
    if acc.is_main_process:
        with atomic_dir(path) as tmp:
            yield tmp
    else:
        yield None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root`` (an output dir's checkpoints/), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


class _Writers:
    """metrics.jsonl always; TensorBoard and Weights & Biases when asked for."""

    def __init__(self, out: Path, report_to: list[str], main: bool, cfg: RunConfig):
        self.path = out / "metrics.jsonl"
        self.main = main
        self.tb = self.wandb = None
        if not main:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingExtraError("tensorboard", "tensorboard", "training.report_to=[tensorboard]") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise MissingExtraError("wandb", "wandb", "training.report_to=[wandb]") from None
            self.wandb = wandb.init(project="posttrain", name=out.name, config=cfg.model_dump(mode="json"))

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numeric, step=record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint a run resumes from, so the curve has no duplicates."""
        if not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
