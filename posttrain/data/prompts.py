"""Tokenized prompts for the online methods: what the policy samples from, and what the rewards need.

A prompt is rendered with the chat template's generation prompt, so the model's next
tokens are its response. The prompt's messages, reference answer and metadata travel
with it to the rewards. A prompt that leaves fewer than ``max_new_tokens`` tokens of room
in ``max_seq_len`` is dropped and counted ("too long").
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posttrain.data.preference import PromptExample
from posttrain.data.report import DataReport, RowIssue
from posttrain.io import atomic_write_bytes


@dataclass
class PromptSet:
    ids: list[np.ndarray]
    info: list[dict]  # {"prompt": messages, "reference": str | None, "metadata": dict, "source": "file:row"}

    def __len__(self) -> int:
        return len(self.ids)

    def row_lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def row(self, r: int) -> dict:
        return {"prompt_ids": self.ids[r].tolist(), **self.info[r]}

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        data = np.concatenate(self.ids).astype(np.int32) if self.ids else np.zeros(0, np.int32)
        info = np.frombuffer(json.dumps(self.info).encode(), dtype=np.uint8)
        np.savez(buf, data=data, lens=np.array([len(x) for x in self.ids], dtype=np.int64), info=info)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> PromptSet:
        z = np.load(path)
        lens = z["lens"]
        ids = list(np.split(z["data"], np.cumsum(lens)[:-1])) if len(lens) else []
        return cls(ids, json.loads(z["info"].tobytes().decode()))


def last_user_text(prompt: list[dict]) -> str:
    """The content of a prompt's last user turn ("" when it has none): what a report or a task list shows of it."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class PromptEncoder:
    tokenizer: object
    max_prompt_len: int
    report: DataReport

    def __call__(self, ex: PromptExample) -> list:
        try:
            ids = render_prompt(self.tokenizer, ex.prompt)
        except Exception as exc:  # noqa: BLE001 - a user's Jinja template can raise anything; report the row
            return self._drop(ex, "chat template error", f"{type(exc).__name__}: {exc}")
        if len(ids) > self.max_prompt_len:
            return self._drop(ex, "too long", f"{len(ids)} prompt tokens leave too little room for the response "
                              f"(max_seq_len - generation.max_new_tokens = {self.max_prompt_len})")
        info = {"prompt": ex.prompt, "reference": ex.reference, "metadata": ex.metadata or {},
                "source": f"{ex.file}:{ex.row}"}
        return [(np.asarray(ids, np.int32), info)]

    def _drop(self, ex: PromptExample, reason: str, detail: str) -> list:
        self.report.drop(RowIssue(ex.file, ex.row, "prompt", reason, detail))
        self.report.unkeep(ex.file)
        return []


def to_prompt_set(items: list) -> PromptSet:
    return PromptSet([ids for ids, _ in items], [info for _, info in items])
