"""Build the tokenized train and eval sets of a stage, cached on disk by fingerprint.

load -> validate (row report) -> split eval -> render + mask -> over-long handling
-> weights -> pack. The fingerprint covers the files' bytes, the tokenizer, its
chat template and every setting that changes the result, so a second run with
the same inputs skips all of it and any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.config import ONLINE_METHODS, DataConfig, DataSource
from posttrain.data.formats import Example
from posttrain.data.packing import pack_best_fit
from posttrain.data.pairs import FEEDBACK_METHODS, PAIR_METHODS, PairEncoder, set_type, to_set
from posttrain.data.prompts import PromptEncoder, PromptSet, to_prompt_set
from posttrain.data.report import DataReport, RowIssue
from posttrain.data.templates import ChatEncoder, Encoded, TemplateMismatch, split_text, truncate
from posttrain.data.validate import load_examples
from posttrain.errors import PosttrainError
from posttrain.io import atomic_write_bytes, atomic_write_text

# Bump when the encoding logic or the cached report changes, so stale caches are never reused.
PIPELINE_VERSION = "3"

METHOD_FORMATS = {
    "pretrain": ("text",),
    "sft": ("alpaca", "messages"),
    "reward": ("preference",),
    "dpo": ("preference",),
    "simpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("feedback", "preference"),
    "grpo": ("prompt",),
    "rft": ("prompt",),
    "online_dpo": ("prompt",),
    "ppo": ("prompt",),
}


@dataclass
class TokenizedSet:
    """Samples as (input_ids, labels) and, when packing, the samples of each row."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    rows: list[list[int]]  # sample indices per training row (one each without packing)

    def __len__(self) -> int:
        return len(self.rows)

    def row_lengths(self) -> list[int]:
        return [sum(len(self.input_ids[i]) for i in row) for row in self.rows]

    def row(self, r: int) -> list[tuple[list[int], list[int]]]:
        return [(self.input_ids[i].tolist(), self.labels[i].tolist()) for i in self.rows[r]]

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
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "TokenizedSet":
        z = np.load(path)
        cuts = np.cumsum(z["lens"])[:-1]
        rcuts = np.cumsum(z["row_lens"])[:-1]
        return cls(
            list(np.split(z["ids"], cuts)) if len(z["lens"]) else [],
            list(np.split(z["labels"], cuts)) if len(z["lens"]) else [],
            [r.tolist() for r in np.split(z["rows"], rcuts)] if len(z["row_lens"]) else [],
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
        "tokenizer": tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")) / "data"


def _check_format(src: DataSource, method: str) -> None:
    if src.format not in METHOD_FORMATS[method]:
        raise PosttrainError(
            f"data file {src.path} has format '{src.format}', which method '{method}' does not take; "
            f"allowed: {', '.join(METHOD_FORMATS[method])}"
        )


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


def _encoder(tokenizer, cfg: DataConfig, report: DataReport, method: str, max_new_tokens: int = 0):
    if method in ONLINE_METHODS:
        return PromptEncoder(tokenizer, cfg.max_seq_len - max_new_tokens, report)
    if method in PAIR_METHODS + FEEDBACK_METHODS:
        return PairEncoder(tokenizer, cfg, report, method)
    return _Encoder(tokenizer, cfg, report)


def _assemble(items: list, cfg: DataConfig, method: str, seed: int):
    if method in ONLINE_METHODS:
        return to_prompt_set(items)
    if method in PAIR_METHODS + FEEDBACK_METHODS:
        return to_set(items, method, seed)
    ds = TokenizedSet(
        [np.asarray(s.input_ids, np.int32) for s in items], [np.asarray(s.labels, np.int32) for s in items], []
    )
    lengths = [len(x) for x in ds.input_ids]
    ds.rows = pack_best_fit(lengths, cfg.max_seq_len) if cfg.packing else [[i] for i in range(len(lengths))]
    return ds


def _build(cfg: DataConfig, tokenizer, method: str, seed: int, max_new_tokens: int = 0):
    report = DataReport()
    encoder = _encoder(tokenizer, cfg, report, method, max_new_tokens)
    rng = random.Random(seed)
    train_items: list = []
    eval_items: list = []
    train_index: list[int] = []

    for src in cfg.train:
        _check_format(src, method)
        examples, _ = load_examples(src.path, src.format, role_map=src.role_map, report=report)
        held = set()
        if not cfg.eval and cfg.eval_fraction > 0 and examples:
            held = set(rng.sample(range(len(examples)), max(1, round(cfg.eval_fraction * len(examples)))))
        mine = []
        for k, ex in enumerate(examples):
            items = encoder(ex)
            if k in held:
                eval_items.extend(items)
                continue
            mine.extend(range(len(train_items), len(train_items) + len(items)))
            train_items.extend(items)
        train_index.extend(_weighted(mine, src.weight, rng))

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
                eval_items.extend(eval_encoder(ex))
        eval_report.check(cfg.max_drop_fraction, "eval data")
        report.merge(eval_report)

    # Weighted repeats share arrays; the index list decides what is trained and how often.
    train = _assemble([train_items[i] for i in train_index], cfg, method, seed)
    report.record_lengths(_example_lengths(train))
    evalset = _assemble(eval_items, cfg, method, seed)
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
        kind = (PromptSet if method in ONLINE_METHODS else set_type(method) if method in PAIR_METHODS + FEEDBACK_METHODS
                else TokenizedSet)
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
