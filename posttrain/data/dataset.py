"""Build the tokenized train and eval sets of a stage, cached on disk by fingerprint.

load -> validate (row report) -> split eval -> render + mask -> over-long handling
-> weights -> pack. The fingerprint covers the files' bytes, the tokenizer, its
chat template and every setting that changes the result, so a second run with
the same inputs skips all of it and any change rebuilds it.

Each example's task (its source's ``task``, else its row's ``task`` field, else "untasked";
"replay" for ``data.replay`` rows) travels with its tokens when the data names any task.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from posttrain.config import ONLINE_METHODS, TASK_METHODS, DataConfig, DataSource, read_yaml
from posttrain.data.formats import Example
from posttrain.data.mixing import REPLAY_TASK
from posttrain.data.packing import pack_best_fit
from posttrain.data.pairs import FEEDBACK_METHODS, PAIR_METHODS, PairEncoder, set_type, to_set
from posttrain.data.prompts import PromptEncoder, PromptSet, to_prompt_set
from posttrain.data.report import DataReport, RowIssue
from posttrain.data.templates import ChatEncoder, Encoded, TemplateMismatch, split_text, truncate
from posttrain.data.validate import load_examples
from posttrain.errors import PosttrainError
from posttrain.io import atomic_write_bytes, atomic_write_text

# Bump when the encoding logic or the cached report changes, so stale caches are never reused.
PIPELINE_VERSION = "4"

METHOD_FORMATS = {
    "pretrain": ("text",),
    "sft": ("alpaca", "messages", "multitask"),
    "reward": ("preference",),
    "dpo": ("preference",),
    "simpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("feedback", "preference"),
    "grpo": ("prompt",),
    "rft": ("prompt",),
    "online_dpo": ("prompt",),
    "ppo": ("prompt",),
    # Logit and on-policy distillation read responses; sequence-level and on-policy distillation read prompts.
    "distill": ("alpaca", "messages", "prompt"),
}
# Replayed data may be plain text in SFT too (the pretraining data a model should not forget).
REPLAY_FORMATS = {"pretrain": ("text",), "sft": ("text", "alpaca", "messages", "multitask")}
# The task of the rows that name none, when others do.
UNTASKED = "untasked"


@dataclass
class TokenizedSet:
    """Samples as (input_ids, labels) and, when packing, the samples of each row."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    rows: list[list[int]]  # sample indices per training row (one each without packing)
    # The task table (the same for a stage's train and eval sets) and each sample's index into it;
    # empty and None when the data names no task.
    task_names: list[str] = field(default_factory=list)
    sample_tasks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def row_lengths(self) -> list[int]:
        return [sum(len(self.input_ids[i]) for i in row) for row in self.rows]

    def row(self, r: int) -> list[tuple]:
        """The row's samples as (input_ids, labels), or (input_ids, labels, task id) when the data has tasks."""
        if self.sample_tasks is None:
            return [(self.input_ids[i].tolist(), self.labels[i].tolist()) for i in self.rows[r]]
        return [(self.input_ids[i].tolist(), self.labels[i].tolist(), int(self.sample_tasks[i])) for i in self.rows[r]]

    def row_tasks(self) -> list[int]:
        """Each row's task id: its first sample's (rows are packed within one task when data.mixing or replay is on)."""
        if self.sample_tasks is None:
            return [0] * len(self.rows)
        return [int(self.sample_tasks[row[0]]) for row in self.rows]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.input_ids))

    def save(self, path: Path) -> None:
        lens = np.array([len(x) for x in self.input_ids], dtype=np.int64)
        row_lens = np.array([len(r) for r in self.rows], dtype=np.int64)
        buf = io.BytesIO()
        np.savez(
            buf,
            ids=_concat(self.input_ids),
            labels=_concat(self.labels),
            lens=lens,
            rows=np.array([i for r in self.rows for i in r], dtype=np.int64),
            row_lens=row_lens,
            task_names=np.array(json.dumps(self.task_names)),
            sample_tasks=self.sample_tasks if self.sample_tasks is not None else np.zeros(0, np.int32),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "TokenizedSet":
        z = np.load(path)
        cuts = np.cumsum(z["lens"])[:-1]
        rcuts = np.cumsum(z["row_lens"])[:-1]
        names = json.loads(str(z["task_names"]))
        return cls(
            list(np.split(z["ids"], cuts)) if len(z["lens"]) else [],
            list(np.split(z["labels"], cuts)) if len(z["lens"]) else [],
            [r.tolist() for r in np.split(z["rows"], rcuts)] if len(z["row_lens"]) else [],
            names,
            z["sample_tasks"] if names else None,
        )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (a clear error when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise PosttrainError(f"cannot read data file {path}: {exc.strerror}") from None
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(sorted(tokenizer.all_special_tokens)).encode())
    return h.hexdigest()


def fingerprint(cfg: DataConfig, tokenizer, method: str, seed: int) -> str:
    parts = {
        "version": PIPELINE_VERSION,
        "method": method,
        "seed": seed,
        "settings": cfg.model_dump(exclude={"train", "eval", "cache_dir"}),
        "train": [(s.model_dump(), file_digest(s.path)) for s in cfg.train],
        "eval": [(s.model_dump(), file_digest(s.path)) for s in cfg.eval],
        "replay": [(s.model_dump(), file_digest(s.path)) for s in replay_sources(cfg)],
        "tokenizer": tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")) / "data"


def _check_format(src: DataSource, method: str, replay: bool = False) -> None:
    allowed = REPLAY_FORMATS[method] if replay else METHOD_FORMATS[method]
    if src.format not in allowed:
        what = "replay data file" if replay else "data file"
        raise PosttrainError(
            f"{what} {src.path} has format '{src.format}', which method '{method}' does not take"
            f"{' as replay' if replay else ''}; allowed: {', '.join(allowed)}"
        )


def replay_sources(cfg: DataConfig) -> list[DataSource]:
    """The files of ``data.replay``: each source as given, or an earlier run folder's ``data.train`` files."""
    if cfg.replay is None:
        return []
    out = []
    for i, src in enumerate(cfg.replay.sources):
        if Path(src.path).is_dir():
            out += _run_train_sources(Path(src.path), src.weight, f"data.replay.sources[{i}]")
        else:
            out.append(src)
    return out


def _run_train_sources(folder: Path, weight: float, where: str) -> list[DataSource]:
    """The training files of the run in ``folder`` (the run's folder or its final/), read from its config.yaml."""
    run = next((d for d in (folder, folder.parent) if (d / "config.yaml").is_file()), None)
    if run is None:
        raise PosttrainError(f"{where}: {folder} is a folder but not a run (no config.yaml in it or its parent); "
                             f"name an earlier run, or the data files to replay")
    raw = read_yaml(run / "config.yaml").get("data")
    try:
        train = DataConfig.model_validate(raw).train
    except ValidationError as exc:
        raise PosttrainError(f"{where}: the data section of {run / 'config.yaml'} is not valid: "
                             f"{exc.errors()[0]['msg']}") from None
    out = []
    for src in train:
        path = Path(src.path)
        # A run's config keeps its paths as given; a relative one is taken from the run's folder if not found here.
        if not path.is_absolute() and not path.exists() and (run / path).exists():
            path = run / path
        out.append(src.model_copy(update={"path": str(path), "weight": src.weight * weight, "task": None}))
    return out


class _Encoder:
    """Encodes examples into samples, recording drops and truncations in the report."""

    def __init__(self, tokenizer, cfg: DataConfig, report: DataReport):
        self.enc = ChatEncoder(tokenizer, cfg.train_on)
        self.cfg = cfg
        self.report = report

    def __call__(self, ex: Example) -> list[Encoded]:
        max_len = self.cfg.max_seq_len
        if ex.text is not None:
            return split_text(self.enc.encode_text(ex.text), max_len)
        try:
            sample = self.enc.encode_messages(ex.messages)
        except TemplateMismatch as exc:
            return self._drop(ex, "chat template not prefix-consistent", str(exc))
        except Exception as exc:  # noqa: BLE001 - a user's Jinja template can raise anything; report the row
            return self._drop(ex, "chat template error", f"{type(exc).__name__}: {exc}")
        if sample.n_trained == 0:
            return self._drop(ex, "no trainable tokens", "no assistant token survives the template/mask")
        if len(sample.input_ids) > max_len:
            if self.cfg.overlong == "drop":
                return self._drop(ex, "too long", f"{len(sample.input_ids)} tokens > max_seq_len={max_len}")
            cut = truncate(sample, max_len)
            if cut is None:
                return self._drop(
                    ex, "too long", f"{len(sample.input_ids)} tokens and no whole response fits in {max_len}"
                )
            self.report.alter(
                RowIssue(ex.file, ex.row, "messages", "truncated", f"{len(sample.input_ids)} -> {len(cut.input_ids)} tokens")
            )
            sample = cut
        return [sample]

    def _drop(self, ex: Example, reason: str, detail: str) -> list[Encoded]:
        self.report.drop(RowIssue(ex.file, ex.row, "messages", reason, detail))
        self.report.unkeep(ex.file)
        return []


def _weighted(indices: list[int], weight: float, rng: random.Random) -> list[int]:
    whole, frac = int(weight), weight - int(weight)
    out = indices * whole
    if frac > 0:
        out += rng.sample(indices, round(frac * len(indices)))
    return out


def reads_prompts(cfg: DataConfig, method: str) -> bool:
    """Whether a stage's data are prompts to sample from (a ``PromptSet``) rather than token rows."""
    return method in ONLINE_METHODS or (method == "distill" and all(s.format == "prompt" for s in cfg.train))


def _encoder(tokenizer, cfg: DataConfig, report: DataReport, method: str, max_new_tokens: int = 0):
    if reads_prompts(cfg, method):
        return PromptEncoder(tokenizer, cfg.max_seq_len - max_new_tokens, report)
    if method in PAIR_METHODS + FEEDBACK_METHODS:
        return PairEncoder(tokenizer, cfg, report, method)
    return _Encoder(tokenizer, cfg, report)


def _assemble(items: list, cfg: DataConfig, method: str, seed: int, tasks: list[str | None] | None = None,
              task_names: list[str] | None = None):
    if reads_prompts(cfg, method):
        return to_prompt_set(items)
    if method in PAIR_METHODS + FEEDBACK_METHODS:
        return to_set(items, method, seed)
    ds = TokenizedSet(
        [np.asarray(s.input_ids, np.int32) for s in items], [np.asarray(s.labels, np.int32) for s in items], []
    )
    lengths = [len(x) for x in ds.input_ids]
    if not task_names:
        ds.rows = pack_best_fit(lengths, cfg.max_seq_len) if cfg.packing else [[i] for i in range(len(lengths))]
        return ds
    ids = {name: k for k, name in enumerate(task_names)}
    ds.task_names = list(task_names)
    ds.sample_tasks = np.array([ids[t or UNTASKED] for t in tasks], dtype=np.int32)
    if not cfg.packing:
        ds.rows = [[i] for i in range(len(lengths))]
    elif cfg.mixing is None and cfg.replay is None:
        ds.rows = pack_best_fit(lengths, cfg.max_seq_len)
    else:
        # Mixing draws rows by task, so a packed row holds one task's samples only.
        ds.rows = []
        for k in range(len(task_names)):
            mine = [i for i, t in enumerate(ds.sample_tasks) if t == k]
            ds.rows += [[mine[j] for j in row] for row in pack_best_fit([lengths[i] for i in mine], cfg.max_seq_len)]
    return ds


def _task_table(*task_lists: list[str | None]) -> list[str]:
    """The sorted task names of a stage's data, "untasked" included when some rows name no task; [] if none do."""
    named = {t for tasks in task_lists for t in tasks if t is not None}
    if named and any(t is None for tasks in task_lists for t in tasks):
        named.add(UNTASKED)
    return sorted(named)


def _build(cfg: DataConfig, tokenizer, method: str, seed: int, max_new_tokens: int = 0):
    report = DataReport()
    encoder = _encoder(tokenizer, cfg, report, method, max_new_tokens)
    rng = random.Random(seed)
    train_items: list = []
    eval_items: list = []
    train_index: list[int] = []
    train_tasks: list[str | None] = []
    eval_tasks: list[str | None] = []

    for src in cfg.train:
        _check_format(src, method)
        examples, _ = load_examples(src.path, src.format, role_map=src.role_map, report=report)
        held = set()
        if not cfg.eval and cfg.eval_fraction > 0 and examples:
            held = set(rng.sample(range(len(examples)), max(1, round(cfg.eval_fraction * len(examples)))))
        mine = []
        for k, ex in enumerate(examples):
            items = encoder(ex)
            task = src.task or getattr(ex, "task", None)
            if k in held:
                eval_items.extend(items)
                eval_tasks.extend([task] * len(items))
                continue
            mine.extend(range(len(train_items), len(train_items) + len(items)))
            train_items.extend(items)
            train_tasks.extend([task] * len(items))
        train_index.extend(_weighted(mine, src.weight, rng))

    if cfg.replay is not None:
        if REPLAY_TASK in train_tasks + eval_tasks:
            raise PosttrainError(f"the task name {REPLAY_TASK!r} is kept for data.replay's rows; rename that task "
                                 f"in the training data")
        for src in replay_sources(cfg):
            _check_format(src, method, replay=True)
            examples, _ = load_examples(src.path, src.format, role_map=src.role_map, report=report)
            start = len(train_items)
            train_items.extend(item for ex in examples for item in encoder(ex))
            train_tasks.extend([REPLAY_TASK] * (len(train_items) - start))
            train_index.extend(_weighted(list(range(start, len(train_items))), src.weight, rng))

    report.check(cfg.max_drop_fraction, "training data")
    if not train_index:
        raise PosttrainError("no training samples remain after the eval split; lower data.eval_fraction")

    eval_report = DataReport()
    if cfg.eval:
        eval_encoder = _encoder(tokenizer, cfg, eval_report, method, max_new_tokens)
        for src in cfg.eval:
            _check_format(src, method)
            examples, _ = load_examples(src.path, src.format, role_map=src.role_map, report=eval_report)
            for ex in examples:
                items = eval_encoder(ex)
                eval_items.extend(items)
                eval_tasks.extend([src.task or getattr(ex, "task", None)] * len(items))
        eval_report.check(cfg.max_drop_fraction, "eval data")
        report.merge(eval_report)

    # Only the supervised methods' loss reads tasks; other methods' batches must not grow a task_ids tensor.
    names = _task_table(train_tasks, eval_tasks) if method in TASK_METHODS else []
    if not names and cfg.mixing is not None:
        names = [UNTASKED]  # data.mixing over data that names no task: one task, every row once per epoch
    # Weighted repeats share arrays; the index list decides what is trained and how often.
    train = _assemble([train_items[i] for i in train_index], cfg, method, seed, [train_tasks[i] for i in train_index],
                      names)
    report.record_lengths(_example_lengths(train))
    evalset = _assemble(eval_items, cfg, method, seed, eval_tasks, names)
    return train, (evalset if len(evalset) else None), report


def _example_lengths(ds) -> list[int]:
    """Tokens per training example as trained (weighted repeats included), before packing joins examples."""
    return [len(x) for x in ds.input_ids] if isinstance(ds, TokenizedSet) else ds.row_lengths()


def cache_folder(cfg: DataConfig, fp: str) -> Path:
    return (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / fp


def build_datasets(cfg: DataConfig, tokenizer, method: str, seed: int, *, log=print, max_new_tokens: int = 0):
    """Return (train, eval or None, report, fingerprint), from the cache when it holds them.

    The sets are ``TokenizedSet`` for pretrain/SFT, ``PairSet`` or ``FeedbackSet`` for the preference methods.
    """
    fp = fingerprint(cfg, tokenizer, f"{method}-{max_new_tokens}", seed)
    folder = cache_folder(cfg, fp)
    if (folder / "report.json").is_file():
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text()))
        kind = (PromptSet if reads_prompts(cfg, method)
                else set_type(method) if method in PAIR_METHODS + FEEDBACK_METHODS else TokenizedSet)
        train = kind.load(folder / "train.npz")
        evalset = kind.load(folder / "eval.npz") if (folder / "eval.npz").is_file() else None
        log(f"tokenized data loaded from cache {folder}")
        return train, evalset, report, fp
    train, evalset, report = _build(cfg, tokenizer, method, seed, max_new_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    train.save(folder / "train.npz")
    if evalset is not None:
        evalset.save(folder / "eval.npz")
    # The report is written last: its presence marks a complete cache entry.
    atomic_write_text(folder / "report.json", report.to_json())
    return train, evalset, report, fp
