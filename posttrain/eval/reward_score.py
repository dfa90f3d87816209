"""Score conversations with a trained reward model: ``posttrain score MODEL DATA``.

The reward model is a transformers sequence classifier with one output; a conversation
is rendered with the model's chat template exactly as in reward-model training, and its
score is the head's output at the last token.

Rows may be preference pairs ({prompt, chosen, rejected}: both are scored, and the pairwise
accuracy is reported), a prompt with a response ({prompt, completion} or {prompt, response}),
or whole conversations ({messages} / ShareGPT {conversations}). The output rows are the input
rows plus ``reward_chosen`` and ``reward_rejected`` (pairs) or ``reward`` (the others), so scores
already in the data (e.g. UltraFeedback's ``score_chosen``) are kept. Bad rows (unreadable,
a template error, longer than the model's context) are reported with file, row and reason,
and left out of the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.formats import Example, normalise
from posttrain.data.loading import read_rows
from posttrain.data.preference import FeedbackExample, PreferenceExample
from posttrain.data.report import DataReport, RowIssue
from posttrain.errors import PosttrainError
from posttrain.io import atomic_write_text


class RewardScorer:
    """A saved reward model and its tokenizer, scoring conversations in batches."""

    def __init__(self, path: str | Path, *, batch_size: int = 16, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.data.templates import ChatEncoder, resolve_chat_template

        path = str(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"cannot load a reward model from {path}: {exc}") from None
        if self.model.config.num_labels != 1:
            raise PosttrainError(
                f"{path} is a classifier with {self.model.config.num_labels} outputs, not a reward model (1 output)"
            )
        resolve_chat_template(self.tokenizer, None)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.encoder = ChatEncoder(self.tokenizer)
        self.batch_size = batch_size
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)

    def encode(self, messages: list[dict]) -> list[int]:
        return self.encoder.encode_messages(messages).input_ids

    def check(self, messages: list[dict]) -> str | None:
        """Why this conversation cannot be scored, or None."""
        try:
            n = len(self.encode(messages))
        except Exception as exc:  # noqa: BLE001 - a Jinja template can raise anything; reported per row
            return f"chat template error: {type(exc).__name__}: {exc}"
        if self.max_len is not None and n > self.max_len:
            return f"too long: {n} tokens > the model's {self.max_len} positions"
        return None

    @torch.no_grad()
    def score(self, conversations: list[list[dict]]) -> list[float]:
        """One score per conversation (each ending with the response to score)."""
        encoded = [self.encode(m) for m in conversations]
        scores = [0.0] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        pad = self.model.config.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(encoded[i])] = torch.as_tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for r, i in enumerate(idx):
                scores[i] = float(logits[r, 0])
        return scores


@dataclass
class ScoreSummary:
    rows_scored: int
    mean_score: float | None
    pairs: int
    pair_accuracy: float | None  # fraction of pairs whose chosen response scores higher
    report: DataReport


def _parse(row: object, file: str, row_no: int):
    """(kind, example) or a list of issues; kind is 'pair', 'single' or 'conversation'."""
    if not isinstance(row, dict):
        return [RowIssue(file, row_no, "", "row is not an object")]
    if "chosen" in row or "rejected" in row:
        result = normalise(row, "preference", file=file, row_no=row_no)
        return ("pair", result) if isinstance(result, PreferenceExample) else result
    if "prompt" in row:
        completion = row.get("completion", row.get("response"))
        # A feedback row with a placeholder label: the same parsing and checks as KTO data.
        result = normalise({"prompt": row["prompt"], "completion": completion, "system": row.get("system"),
                            "label": True}, "feedback", file=file, row_no=row_no)
        return ("single", result) if isinstance(result, FeedbackExample) else result
    result = normalise(row, "messages", file=file, row_no=row_no)
    return ("conversation", result) if isinstance(result, Example) else result


def score_file(model: str | Path, data: str | Path, out: str | Path, *, batch_size: int = 16,
               log=print) -> ScoreSummary:
    """Score every usable row of ``data`` and write the rows with their scores to ``out`` (JSONL)."""
    scorer = RewardScorer(model, batch_size=batch_size)
    report = DataReport()
    file = str(data)
    report.read(file, 0)
    rows, convs, where = [], [], []  # where: (row index, output key) per conversation
    for row_no, row in read_rows(data):
        report.read(file)
        parsed = row if isinstance(row, RowIssue) else _parse(row, file, row_no)
        if isinstance(parsed, RowIssue) or isinstance(parsed, list):
            issue = parsed if isinstance(parsed, RowIssue) else parsed[0]
            report.drop(issue)
            continue
        kind, ex = parsed
        if kind == "pair":
            mine = [(ex.prompt + ex.chosen, "reward_chosen"), (ex.prompt + ex.rejected, "reward_rejected")]
        elif kind == "single":
            mine = [(ex.prompt + ex.completion, "reward")]
        else:
            mine = [(ex.messages, "reward")]
        problem = next((p for p in (scorer.check(m) for m, _ in mine) if p), None)
        if problem:
            reason, _, detail = problem.partition(": ")
            report.drop(RowIssue(file, row_no, "", reason, detail))
            continue
        report.kept(file)
        k = len(rows)
        rows.append(dict(row))
        for messages, key in mine:
            convs.append(messages)
            where.append((k, key))
    if not rows:
        raise PosttrainError(f"no row of {file} can be scored.\n{report.format()}")
    scores = scorer.score(convs)
    for (k, key), s in zip(where, scores):
        rows[k][key] = s
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    singles = [r["reward"] for r in rows if "reward" in r]
    pairs = [r for r in rows if "reward_chosen" in r]
    summary = ScoreSummary(
        rows_scored=len(rows),
        mean_score=sum(singles) / len(singles) if singles else None,
        pairs=len(pairs),
        pair_accuracy=sum(r["reward_chosen"] > r["reward_rejected"] for r in pairs) / len(pairs) if pairs else None,
        report=report,
    )
    if report.total_dropped:
        log(report.format("rows not scored"))
    return summary
