"""Run a config's eval suites on a model, before and after a stage, and write eval.json.

eval.json (in the run directory)::

    {"model", "start_model", "method", "run_dir", "step",
     "suites": [{"name", "type", "metric", "higher_is_better", "n", "before": {...} | null, "after": {...},
                 "samples_before", "samples_after", "skipped"}],
     "forgetting": {"suite", "metric", "before", "after", "change", "threshold", "regressed"} | null}

Samples go to ``eval_samples/{before,after}/<suite>.jsonl`` beside it. Evaluation runs under
``torch.random.fork_rng`` so that a run with an eval section trains exactly like one without.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.config import EvalConfig, RunConfig
from posttrain.eval.suites import SuiteResult, run_suite, write_samples
from posttrain.io import atomic_write_text


def evaluate(model, tokenizer, ecfg: EvalConfig, *, max_seq_len: int, samples_dir: Path | None = None,
             log=print) -> dict[str, SuiteResult]:
    """Every suite on ``model``; the model's train/eval mode and the RNG state are left as they were."""
    was_training = model.training
    results = {}
    try:
        with torch.random.fork_rng(devices=[]):
            for suite in ecfg.suites:
                result = run_suite(suite, model, tokenizer, max_seq_len=max_seq_len)
                results[suite.name] = result
                if result.skipped:
                    log(f"eval {suite.name}: skipped: {result.skipped}")
                    continue
                log(f"eval {suite.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
                if samples_dir is not None and result.samples:
                    write_samples(samples_dir / f"{suite.name}.jsonl", result.samples)
    finally:
        model.train(was_training)
    return results


def _as_dict(result: SuiteResult | None) -> dict | None:
    return None if result is None or result.skipped else dict(result.metrics)


def forgetting(ecfg: EvalConfig, before: dict | None, after: dict) -> dict | None:
    """The forgetting suite's headline before and after, its relative worsening and whether it passed the threshold."""
    f = ecfg.forgetting
    if f is None or not before or before.get(f.suite) is None or after.get(f.suite) is None:
        return None
    result = after[f.suite]
    metric, higher = result.metric, result.higher_is_better
    b, a = before[f.suite].metrics.get(metric), result.metrics.get(metric)
    if b is None or a is None:
        return None
    worse = (b - a) if higher else (a - b)
    change = worse / abs(b) if b else float(worse > 0)
    return {"suite": f.suite, "metric": metric, "before": b, "after": a, "change": change,
            "threshold": f.threshold, "regressed": change > f.threshold}


def eval_record(ecfg: EvalConfig, before: dict | None, after: dict, **info) -> dict:
    suites = []
    for suite in ecfg.suites:
        a, b = after[suite.name], (before or {}).get(suite.name)
        has = {k: bool(r is not None and r.samples and not r.skipped) for k, r in (("after", a), ("before", b))}
        suites.append({
            "name": suite.name, "type": suite.type, "metric": a.metric, "higher_is_better": a.higher_is_better,
            "n": a.n, "before": _as_dict(b), "after": _as_dict(a),
            "samples_before": f"eval_samples/before/{suite.name}.jsonl" if has["before"] else None,
            "samples_after": f"eval_samples/after/{suite.name}.jsonl" if has["after"] else None,
            "skipped": a.skipped,
        })
    return {**info, "suites": suites, "forgetting": forgetting(ecfg, before, after)}


def write_eval_json(out_dir: Path, record: dict, log=print) -> Path:
    path = Path(out_dir) / "eval.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    f = record.get("forgetting")
    if f and f["regressed"]:
        log(f"FORGETTING: {f['suite']} {f['metric']} went from {f['before']:.4g} to {f['after']:.4g} "
            f"({100 * f['change']:+.1f}% worse; threshold {100 * f['threshold']:.0f}%)")
    return path


def step_hook(ecfg: EvalConfig, acc, model_ref, tokenizer, max_seq_len: int):
    """A loop hook running the suites every ``ecfg.every_steps`` steps: {"suite/<name>/<metric>": value}."""
    def hook(step: int) -> dict:
        if step % ecfg.every_steps or not acc.is_main_process:
            return {}
        results = evaluate(acc.unwrap_model(model_ref()), tokenizer, ecfg, max_seq_len=max_seq_len,
                           log=lambda *a, **k: None)
        return {f"suite/{name}/{k}": v for name, r in results.items() for k, v in r.metrics.items()}
    return hook


def run_eval(cfg: RunConfig, *, model_path: str | None = None, compare: str | None = None,
             out_dir: str | Path | None = None, log=print) -> Path:
    """``posttrain eval``: the config's suites on its model (or ``model_path``), ``compare`` as the "before"."""
    from posttrain.data.templates import resolve_chat_template
    from posttrain.errors import PosttrainError
    from posttrain.models.load import load_model, load_tokenizer

    if cfg.eval is None:
        raise PosttrainError("the config has no eval section: add eval: {suites: [...]} (see docs/eval.md)")
    out = Path(out_dir or cfg.output_dir)

    def on(name: str, tag: str) -> dict:
        mcfg = cfg.model.model_copy(update={"name_or_path": name}) if name else cfg.model
        tokenizer = load_tokenizer(mcfg)
        resolve_chat_template(tokenizer, cfg.model.chat_template)
        model = load_model(mcfg)
        log(f"evaluating {mcfg.name_or_path} ({tag})")
        return evaluate(model, tokenizer, cfg.eval, max_seq_len=cfg.data.max_seq_len,
                        samples_dir=out / "eval_samples" / tag, log=log)

    target = model_path or cfg.model.name_or_path
    before = on(compare, "before") if compare else None
    after = on(target, "after")
    record = eval_record(cfg.eval, before, after, model=target, start_model=compare, method=None,
                         run_dir=str(out), step=None)
    return write_eval_json(out, record, log=log)
