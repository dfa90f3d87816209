"""Measure what the planner predicts: the peak bytes of live tensors during real training steps on CPU.

Peak RSS would count the Python and torch runtime and whatever the C allocator keeps cached, neither of
which is the training step. Instead a ``TorchDispatchMode`` sees every tensor an operator returns,
forward, backward and optimizer alike; each new storage is counted once and uncounted by a weak-reference
finalizer when torch frees it. Tensors alive before (the weights, buffers) are the starting level. The
result is the peak of the bytes that torch's tensors hold, which is what a GPU's
``max_memory_allocated`` reports, without its allocator's rounding and cache.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from posttrain.config import TuningConfig


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive while active, and their peak (``peak``, ``current``)."""

    def __init__(self, already_alive=()):
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.current = self.peak = 0
        for t in already_alive:
            self._count(t)
        self.start = self.peak = self.current

    def _count(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata  # the storage's address: one count however many views share it
        if key in self._sizes or storage.nbytes() == 0:
            return
        self._sizes[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


@dataclass(frozen=True)
class Measured:
    peak: int  # bytes of live tensors at the peak of the steps
    start: int  # bytes alive before the first step (weights, buffers)
    trainable: int


def measure_training_steps(model_dir: str | Path, tuning: TuningConfig, seq_len: int, batch_size: int, *,
                           steps: int = 2, gradient_checkpointing: bool = False, chunked_head: bool = True,
                           seed: int = 0) -> Measured:
    """Run ``steps`` steps of posttrain's ``Trainer`` (SFT loss, AdamW, clipping) on CPU and measure their peak.

    Every row is ``seq_len`` random trained tokens, so each micro-batch is exactly ``batch_size x seq_len``
    with no padding. Two steps: the second starts with AdamW's states allocated, as every later step does.
    """
    import numpy as np
    from accelerate import Accelerator

    from posttrain.config import load_config
    from posttrain.data.dataset import TokenizedSet
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.trainers.loop import Trainer
    from posttrain.trainers.supervised import SupervisedMethod
    from posttrain.tuning import apply_tuning, count_parameters

    with tempfile.TemporaryDirectory(prefix="posttrain-measure-") as tmp:
        cfg = load_config(None, raw={
            "model": {"name_or_path": str(model_dir), "dtype": "float32"}, "method": "sft",
            "tuning": tuning.model_dump(),
            # The rows are made here; the loop never reads this path.
            "data": {"train": str(Path(tmp) / "unused.jsonl"), "max_seq_len": max(seq_len, 8)},
            "training": {"max_steps": steps, "batch_size": batch_size, "learning_rate": 1e-4, "seed": seed,
                         "logging_steps": steps, "progress_bar": False,
                         "gradient_checkpointing": gradient_checkpointing, "chunked_head": chunked_head,
                         "lr_scheduler": "constant"},
            "output_dir": str(Path(tmp) / "run"),
        })
        (Path(tmp) / "run").mkdir()
        tokenizer = load_tokenizer(cfg.model)
        model = apply_tuning(load_model(cfg.model, tuning.mode), cfg.tuning)
        rng = np.random.default_rng(seed)
        low = len(tokenizer.all_special_ids)
        rows = [rng.integers(low, len(tokenizer), seq_len).astype(np.int32) for _ in range(steps * batch_size)]
        train = TokenizedSet(rows, [r.copy() for r in rows], [[i] for i in range(len(rows))])
        acc = Accelerator(cpu=True)
        method = SupervisedMethod(tokenizer.pad_token_id, chunked=cfg.training.chunked_head)
        trainer = Trainer(cfg, acc, model, tokenizer, method, train, None, log=lambda *a, **k: None)
        alive = [*trainer.model.parameters(), *trainer.model.buffers()]
        with LiveTensorBytes(alive) as live:
            trainer.fit()
        trainable, _ = count_parameters(trainer.model)
        return Measured(peak=live.peak, start=live.start, trainable=trainable)
