"""Read what a training run directory holds: run.json, config.yaml, metrics, data report, eval results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from posttrain.errors import PosttrainError

SAMPLES_PER_SUITE = 5


@dataclass
class Run:
    """One run directory; ``name`` (the folder's name) is the stage name in the report."""

    path: Path
    info: dict  # run.json
    config: dict  # config.yaml
    metrics: list[dict]  # metrics.jsonl, numeric values only
    data: dict | None  # data_report.json
    eval: dict | None  # eval.json
    samples: dict[str, list[dict]] = field(default_factory=dict)  # suite -> rows pairing before and after

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return self.info.get("method") or self.config.get("method") or "?"

    @property
    def start_model(self) -> str:
        model = self.config.get("model") or {}
        return model.get("name_or_path") or (self.eval or {}).get("start_model") or "?"

    @property
    def duration_s(self) -> float | None:
        try:
            start, end = (datetime.strptime(self.info[k], "%Y-%m-%dT%H:%M:%S%z") for k in ("started", "ended"))
        except (KeyError, TypeError, ValueError):
            return None
        return (end - start).total_seconds()


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise PosttrainError(f"run directory {path} does not exist")
    if not (path / "metrics.jsonl").is_file():
        raise PosttrainError(f"{path} is not a training run directory: it has no metrics.jsonl")
    evaluation = _json(path / "eval.json")
    run = Run(
        path=path,
        info=_json(path / "run.json") or {},
        config=_yaml(path / "config.yaml"),
        metrics=_metrics(path / "metrics.jsonl"),
        data=_json(path / "data_report.json"),
        eval=evaluation,
    )
    for suite in (evaluation or {}).get("suites") or []:
        rows = _paired_samples(path, suite)
        if rows:
            run.samples[suite["name"]] = rows
    return run


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PosttrainError(f"{path} is not valid JSON: {exc}") from None


def _yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PosttrainError(f"{path} is not valid YAML: {exc}") from None


def _metrics(path: Path) -> list[dict]:
    """Numeric, finite values per logged line; a line cut short by a run still writing is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not _number(record.get("step")):
            continue
        records.append({k: float(v) for k, v in record.items() if _number(v)})
    return records


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _jsonl(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _paired_samples(run_dir: Path, suite: dict) -> list[dict]:
    """The first samples after training, each with the same prompt's sample before (matched on the prompt)."""
    after = _jsonl(run_dir / suite["samples_after"], SAMPLES_PER_SUITE) if suite.get("samples_after") else []
    before = _jsonl(run_dir / suite["samples_before"]) if suite.get("samples_before") else []
    by_prompt = {json.dumps(row.get("prompt"), sort_keys=True): row for row in before}
    return [{"after": row, "before": by_prompt.get(json.dumps(row.get("prompt"), sort_keys=True))} for row in after]
