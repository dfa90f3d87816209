"""Tokenized preference pairs and feedback examples, the data shapes of the preference methods.

A pair keeps its chosen and rejected sequences whole (prompt + response), with labels
on the response's assistant tokens only; they are padded into one batch so the
policy scores both in a single forward pass. A feedback example (KTO) also names a
fixed *partner* example: its prompt with the partner's response is the mismatched
pair from which KTO estimates its reference point. Fixing the partner at build time
keeps that estimate a pure function of the data, so the reference model's
log-probs of the mismatched pairs can be precomputed like any other.

Pairs are never truncated: cutting a response can change which one is better.
Pairs longer than ``max_seq_len`` are dropped and counted in the report.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from posttrain.config import DataConfig
from posttrain.data.preference import PreferenceExample
from posttrain.data.report import DataReport, RowIssue
from posttrain.data.templates import ChatEncoder, Encoded, TemplateMismatch
from posttrain.errors import PosttrainError
from posttrain.io import atomic_write_bytes

PAIR_METHODS = ("reward", "dpo", "simpo", "orpo")
FEEDBACK_METHODS = ("kto",)


def _save_arrays(path: Path, ragged: dict[str, list[np.ndarray]], flat: dict[str, np.ndarray]) -> None:
    arrays = {}
    for name, parts in ragged.items():
        arrays[f"{name}__data"] = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        arrays[f"{name}__lens"] = np.array([len(p) for p in parts], dtype=np.int64)
    arrays.update({k: v for k, v in flat.items() if v is not None})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load_ragged(z, name: str) -> list[np.ndarray]:
    lens = z[f"{name}__lens"]
    return list(np.split(z[f"{name}__data"], np.cumsum(lens)[:-1])) if len(lens) else []


@dataclass
class PairSet:
    """Preference pairs. ``ref``: the reference model's log-probs (chosen, rejected), once computed."""

    chosen_ids: list[np.ndarray]
    chosen_labels: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    rejected_labels: list[np.ndarray]
    margin: np.ndarray  # score.chosen - score.rejected per pair; NaN where the row has no score
    ref: np.ndarray | None = None  # (n, 2) float32

    RAGGED = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")

    def __len__(self) -> int:
        return len(self.chosen_ids)

    def row_lengths(self) -> list[int]:
        return [max(len(c), len(r)) for c, r in zip(self.chosen_ids, self.rejected_ids)]

    def row(self, r: int) -> dict:
        item = {
            "chosen": (self.chosen_ids[r].tolist(), self.chosen_labels[r].tolist()),
            "rejected": (self.rejected_ids[r].tolist(), self.rejected_labels[r].tolist()),
            "margin": float(self.margin[r]),
        }
        if self.ref is not None:
            item["ref"] = self.ref[r].tolist()
        return item

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.chosen_ids) + sum(len(x) for x in self.rejected_ids))

    def save(self, path: Path) -> None:
        _save_arrays(path, {k: getattr(self, k) for k in self.RAGGED}, {"margin": self.margin})

    @classmethod
    def load(cls, path: Path) -> "PairSet":
        z = np.load(path)
        return cls(*(_load_ragged(z, k) for k in cls.RAGGED), margin=z["margin"])


@dataclass
class FeedbackSet:
    """Examples labelled desirable or not; ``partner[i]`` lends its response to i's mismatched pair.

    ``ref``: the reference model's log-probs (own response, mismatched pair), once computed.
    """

    ids: list[np.ndarray]
    labels: list[np.ndarray]
    prompt_len: np.ndarray  # tokens before the response
    desirable: np.ndarray  # bool
    partner: np.ndarray  # int
    ref: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def row_lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def mismatched(self, i: int) -> tuple[list[int], list[int]]:
        """Example i's prompt followed by its partner's response (labels on the response)."""
        j = int(self.partner[i])
        p, q = int(self.prompt_len[i]), int(self.prompt_len[j])
        ids = self.ids[i][:p].tolist() + self.ids[j][q:].tolist()
        labels = [-100] * p + self.labels[j][q:].tolist()
        return ids, labels

    def row(self, r: int) -> dict:
        item = {
            "seq": (self.ids[r].tolist(), self.labels[r].tolist()),
            "kl": self.mismatched(r),
            "desirable": bool(self.desirable[r]),
        }
        if self.ref is not None:
            item["ref"] = self.ref[r].tolist()
        return item

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))

    def save(self, path: Path) -> None:
        flat = {"prompt_len": self.prompt_len, "desirable": self.desirable, "partner": self.partner}
        _save_arrays(path, {"ids": self.ids, "labels": self.labels}, flat)

    @classmethod
    def load(cls, path: Path) -> "FeedbackSet":
        z = np.load(path)
        return cls(_load_ragged(z, "ids"), _load_ragged(z, "labels"), z["prompt_len"], z["desirable"], z["partner"])


def set_type(method: str):
    return FeedbackSet if method in FEEDBACK_METHODS else PairSet


# ---- encoding ----------------------------------------------------------------------------------


@dataclass
class _Pair:
    chosen: Encoded
    rejected: Encoded
    margin: float


@dataclass
class _Feedback:
    seq: Encoded
    prompt_len: int
    desirable: bool


@dataclass
class PairEncoder:
    """Encodes examples into pairs or feedback items, recording drops in the report."""

    tokenizer: object
    cfg: DataConfig
    report: DataReport
    method: str
    enc: ChatEncoder = field(init=False)

    def __post_init__(self):
        self.enc = ChatEncoder(self.tokenizer, "all_assistant")

    def _response(self, ex, prompt: list[dict], response: list[dict], where: str) -> Encoded | str:
        """The encoded prompt + response, or the reason it cannot be used."""
        try:
            sample = self.enc.encode_messages(prompt + response, train_from=len(prompt))
        except TemplateMismatch as exc:
            return self._drop(ex, where, "chat template not prefix-consistent", str(exc))
        except Exception as exc:  # noqa: BLE001 - a user's Jinja template can raise anything; report the row
            return self._drop(ex, where, "chat template error", f"{type(exc).__name__}: {exc}")
        if sample.n_trained == 0:
            return self._drop(ex, where, "no trainable tokens", "no response token survives the template")
        if len(sample.input_ids) > self.cfg.max_seq_len:
            return self._drop(
                ex, where, "too long",
                f"{len(sample.input_ids)} tokens > max_seq_len={self.cfg.max_seq_len}; pairs are never truncated",
            )
        return sample

    def _drop(self, ex, where: str, reason: str, detail: str) -> str:
        self.report.drop(RowIssue(ex.file, ex.row, where, reason, detail))
        self.report.unkeep(ex.file)
        return reason

    def __call__(self, ex) -> list:
        if isinstance(ex, PreferenceExample):
            chosen = self._response(ex, ex.prompt, ex.chosen, "chosen")
            if isinstance(chosen, str):
                return []
            rejected = self._response(ex, ex.prompt, ex.rejected, "rejected")
            if isinstance(rejected, str):
                return []
            self._note(ex)
            if self.method in FEEDBACK_METHODS:  # KTO on pairs: one desirable and one undesirable example
                return [_Feedback(chosen, chosen.spans[0][0], True), _Feedback(rejected, rejected.spans[0][0], False)]
            margin = (
                ex.score_chosen - ex.score_rejected
                if ex.score_chosen is not None and ex.score_rejected is not None
                else float("nan")
            )
            return [_Pair(chosen, rejected, margin)]
        seq = self._response(ex, ex.prompt, ex.completion, "completion")
        if isinstance(seq, str):
            return []
        return [_Feedback(seq, seq.spans[0][0], ex.desirable)]

    def _note(self, ex: PreferenceExample) -> None:
        if ex.score_chosen is not None and ex.score_rejected is not None:
            self.report.note("pairs with a score")
        if ex.reject_reason:
            reason = f"reject_reason: {ex.reject_reason.strip()[:60]}"
            # Free-text reasons could each be unique: the report keeps the first few dozen apart.
            if reason not in self.report.notes and sum(k.startswith("reject_reason") for k in self.report.notes) >= 50:
                reason = "reject_reason: (other)"
            self.report.note(reason)


def _derangement(n: int, rng: random.Random) -> np.ndarray:
    """A partner for every example that is never itself (when n > 1)."""
    order = list(range(n))
    rng.shuffle(order)
    partner = np.zeros(n, dtype=np.int64)
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def to_set(items: list, method: str, seed: int):
    """Assemble encoded items (in training order, repeats included) into a PairSet or FeedbackSet."""
    if method in FEEDBACK_METHODS:
        return FeedbackSet(
            [np.asarray(x.seq.input_ids, np.int32) for x in items],
            [np.asarray(x.seq.labels, np.int32) for x in items],
            np.array([x.prompt_len for x in items], dtype=np.int64),
            np.array([x.desirable for x in items], dtype=bool),
            _derangement(len(items), random.Random(f"{seed}-partners")),
        )
    return PairSet(
        [np.asarray(x.chosen.input_ids, np.int32) for x in items],
        [np.asarray(x.chosen.labels, np.int32) for x in items],
        [np.asarray(x.rejected.input_ids, np.int32) for x in items],
        [np.asarray(x.rejected.labels, np.int32) for x in items],
        np.array([x.margin for x in items], dtype=np.float64),
    )


def check_feedback_balance(train: FeedbackSet) -> None:
    n_good = int(train.desirable.sum())
    if n_good == 0 or n_good == len(train):
        kind = "undesirable" if n_good == 0 else "desirable"
        raise PosttrainError(
            f"KTO needs both desirable and undesirable examples, but every training example is {kind}"
        )

