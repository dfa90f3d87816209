"""Hand-written run directories for the report tests: what a stage and its evaluation leave on disk."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# A reply with markup and two lines: the report must escape it and keep its line break.
TRICKY = "<b>7</b> & done\nsecond line"
LONG = "6" * 1000  # cut in the report


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _samples(run: Path, tag: str, suite: str, completions: list[str], scores: list[float]) -> str:
    rel = f"eval_samples/{tag}/{suite}.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i), "completion": c, "score": s}
            for i, (c, s) in enumerate(zip(completions, scores))]
    _jsonl(run / rel, rows)
    return rel


def _metrics(method: str, steps: int) -> list[dict]:
    rows = [{"step": 0, "epoch": 0.0, "eval_loss": 3.0}]
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 3.0 / s, "lr": 1e-3 * (1 - s / (steps + 1)), "grad_norm": 1.0, "tokens_per_sec": 99}
        if method == "grpo":
            row.update({"reward": 0.1 * s, "reward_std": 0.2, "kl": 0.01 * s, "entropy": 1.0 - 0.05 * s})
        if method == "dpo":
            row.update({"rewards/accuracy": 0.5 + 0.05 * s, "rewards/margin": 0.1 * s})
        rows.append(row)
    rows.append({"step": steps, "eval_loss": 2.0, "eval_reward/exact": 0.4, "eval_rewards/accuracy": 0.8})
    return rows


def make_run(root: Path, name: str, method: str, *, suites: list[dict] | None = None,
             forgetting: dict | None = None, steps: int = 8) -> Path:
    """A finished run in ``root/name``; ``suites`` (eval.json's) with sample files when given."""
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "status": "completed", "method": method, "seed": 0, "steps": steps, "trainable_params": 1000,
        "total_params": 4000, "started": "2026-01-01T10:00:00+0000", "ended": "2026-01-01T10:02:05+0000",
    }))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "method": method, "output_dir": str(run), "model": {"name_or_path": f"models/before-{name}"}}))
    _jsonl(run / "metrics.jsonl", _metrics(method, steps))
    (run / "data_report.json").write_text(json.dumps({
        "rows_read": {"train.jsonl": 120, "eval.jsonl": 10},
        "rows_kept": {"train.jsonl": 113, "eval.jsonl": 10},
        "dropped": {"too long": 4, "schema error": {"train.jsonl": 3}},
        "altered": {"truncated": 2},
        "examples": {"too long": [{"file": "train.jsonl", "row": 17, "field": "messages", "reason": "too long",
                                   "detail": "300 tokens > max_seq_len=96"}]},
        "notes": {},
        "lengths": {"bins": [10, 20, 30, 40], "counts": [30, 60, 23]},
    }))
    if suites is not None:
        for suite in suites:
            if suite["type"] == "generation":
                suite["samples_before"] = _samples(run, "before", suite["name"], ["\n\n\n", "5", "9", "6"],
                                                   [0.0, 0.0, 1.0, 1.0])
                suite["samples_after"] = _samples(run, "after", suite["name"], ["0", TRICKY, "8", LONG],
                                                  [1.0, 1.0, 0.0, 0.0])
        (run / "eval.json").write_text(json.dumps({
            "model": str(run / "final"), "start_model": f"models/before-{name}", "method": method,
            "run_dir": str(run), "step": steps, "suites": suites, "forgetting": forgetting}))
    return run


def generation(before: float | None, after: float) -> dict:
    return {"name": "heldout", "type": "generation", "metric": "exact_match", "higher_is_better": True, "n": 256,
            "before": None if before is None else {"exact_match": before}, "after": {"exact_match": after}}


def perplexity(before: float, after: float) -> dict:
    return {"name": "general", "type": "perplexity", "metric": "perplexity", "higher_is_better": False, "n": 64,
            "before": {"perplexity": before, "loss": 3.69}, "after": {"perplexity": after, "loss": 3.71}}


def forgetting(before: float, after: float, threshold: float = 0.1) -> dict:
    change = (after - before) / before
    return {"suite": "general", "metric": "perplexity", "before": before, "after": after, "change": change,
            "threshold": threshold, "regressed": change > threshold}


def three_stages(root: Path) -> list[Path]:
    """sft helps (small perplexity rise), dpo hurts held-out accuracy and forgets, grpo has no eval.json."""
    return [
        make_run(root, "sft", "sft", suites=[generation(0.12, 0.73), perplexity(40.1, 41.0)],
                 forgetting=forgetting(40.1, 41.0)),
        make_run(root, "dpo", "dpo", suites=[generation(0.73, 0.7), perplexity(41.0, 48.5)],
                 forgetting=forgetting(41.0, 48.5)),
        make_run(root, "grpo", "grpo"),
    ]
