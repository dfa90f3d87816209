"""The report's sections, built from loaded runs as document blocks."""

from __future__ import annotations

import json
import re

from posttrain.eval.report import plots
from posttrain.eval.report.document import Bullets, Cell, Document, Figure, Heading, Para, Table
from posttrain.eval.report.runs import Run

NONE = "—"
SAMPLE_CHARS = 600  # a generation longer than this is cut in the report


def build_document(runs: list[Run], title: str) -> Document:
    doc = Document(title)
    doc.add(*_summary(runs))
    doc.add(*_evaluation(runs))
    doc.add(*_curves(runs))
    doc.add(*_samples(runs))
    doc.add(*_data(runs))
    return doc


def _num(x) -> str:
    return NONE if x is None else f"{x:.4g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s" if minutes else f"{secs}s"


# ---- summary -------------------------------------------------------------------------------------------------


def _summary(runs: list[Run]) -> list:
    rows = []
    for run in runs:
        status = run.info.get("status", "unknown")
        steps = run.info.get("steps", max((m["step"] for m in run.metrics), default=None))
        rows.append([
            Cell(run.name), Cell(run.method), Cell(status, "" if status == "completed" else "bad"),
            Cell(NONE if steps is None else str(int(steps))), Cell(str(run.start_model)),
            Cell(_duration(run.duration_s)), Cell(_params(run.info)),
        ])
    header = ["Stage", "Method", "Status", "Steps", "Start model", "Duration", "Trainable params"]
    return [Heading("Runs"), Table(header, rows)]


def _params(info: dict) -> str:
    trainable, total = info.get("trainable_params"), info.get("total_params")
    if not trainable or not total:
        return NONE
    return f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


# ---- evaluation ----------------------------------------------------------------------------------------------


def verdict(before: float | None, after: float | None, higher_is_better: bool) -> str | None:
    """"better", "worse" or "no gain" for a metric that went from ``before`` to ``after``; None without both."""
    if before is None or after is None:
        return None
    gain = (after - before) if higher_is_better else (before - after)
    return "better" if gain > 0 else "worse" if gain < 0 else "no gain"


def _headline(suite: dict, side: str) -> float | None:
    return (suite.get(side) or {}).get(suite.get("metric"))


def _suite_cell(suite: dict | None) -> Cell:
    if suite is None:
        return Cell(NONE)
    if suite.get("after") is None:
        return Cell(f"skipped: {suite['skipped']}" if suite.get("skipped") else "not evaluated", "bad")
    before, after = _headline(suite, "before"), _headline(suite, "after")
    word = verdict(before, after, suite.get("higher_is_better", True))
    if word is None:
        return Cell(f"{_num(after)} (no before)")
    label = "WORSE" if word == "worse" else word
    text = f"{_num(before)} → {_num(after)} ({after - before:+.3g}, {label})"
    return Cell(text, "good" if word == "better" else "bad")


def _relative(change: float) -> str:
    return f"{100 * abs(change):.1f}% {'worse' if change > 0 else 'better'}" if change else "unchanged"


def _forgetting_cell(f: dict | None) -> Cell:
    if not f:
        return Cell("not measured")
    what = f"{f['suite']} {f['metric']} {_num(f['before'])} → {_num(f['after'])}, {_relative(f['change'])}"
    limit = f"threshold {100 * f['threshold']:.0f}%"
    if f.get("regressed"):
        return Cell(f"⚠ FORGETTING: {what} (over the {limit})", "bad")
    return Cell(f"ok: {what} ({limit})", "good")


def _suites(runs: list[Run]) -> dict[str, dict]:
    """Every suite by name, in order of first appearance (its first description: metric and direction)."""
    suites: dict[str, dict] = {}
    for run in runs:
        for suite in (run.eval or {}).get("suites") or []:
            suites.setdefault(suite["name"], suite)
    return suites


def _by_name(run: Run) -> dict[str, dict]:
    return {s["name"]: s for s in (run.eval or {}).get("suites") or []}


def _evaluation(runs: list[Run]) -> list:
    evaluated = [r for r in runs if r.eval]
    if not evaluated:
        return []
    suites = _suites(evaluated)
    header = ["Stage", "Method"] + [
        f"{name}: {s.get('metric')} ({'higher' if s.get('higher_is_better', True) else 'lower'} is better)"
        for name, s in suites.items()
    ] + ["Forgetting"]
    rows = [
        [Cell(r.name), Cell(r.method)] + [_suite_cell(_by_name(r).get(name)) for name in suites]
        + [_forgetting_cell(r.eval.get("forgetting"))]
        for r in evaluated
    ]
    blocks = [
        Heading("Evaluation"),
        Para("Each cell is a suite's primary metric before the stage (its start model) → after it, with the change."),
        Table(header, rows),
        Heading("Where training did not help", 3),
        Bullets(_findings(evaluated)),
    ]
    for k, (name, suite) in enumerate(suites.items()):
        blocks.append(_suite_chart(evaluated, name, suite, f"eval-{k}-{_slug(name)}.png"))
    return blocks


def _findings(runs: list[Run]) -> list[Cell]:
    found = []
    for run in runs:
        for name, suite in _by_name(run).items():
            before, after = _headline(suite, "before"), _headline(suite, "after")
            word = verdict(before, after, suite.get("higher_is_better", True))
            if word in ("worse", "no gain"):
                found.append(Cell(f"{run.name} ({run.method}) did not improve {name}: {suite['metric']} "
                                  f"{_num(before)} → {_num(after)} ({word}).", "bad"))
        f = run.eval.get("forgetting")
        if f and f.get("regressed"):
            found.append(Cell(f"{run.name} ({run.method}) forgot: {_forgetting_cell(f).text}.", "bad"))
    return found or [Cell("Every evaluated suite improved in every stage, with no forgetting regression.", "good")]


def _suite_chart(runs: list[Run], name: str, suite: dict, file_name: str) -> Figure:
    having = [r for r in runs if name in _by_name(r)]
    before = [_headline(_by_name(r)[name], "before") for r in having]
    after = [_headline(_by_name(r)[name], "after") for r in having]
    metric = suite.get("metric", "?")
    direction = "higher" if suite.get("higher_is_better", True) else "lower"
    title = f"{name}: {metric} per stage ({direction} is better)"
    png = plots.suite_bars([r.name for r in having], before, after, metric, title)
    return Figure(file_name, png, title)


# ---- training curves -----------------------------------------------------------------------------------------


def _curves(runs: list[Run]) -> list:
    blocks = [Heading("Training curves")]
    for i, run in enumerate(runs):
        groups = plots.curve_groups(run.metrics)
        blocks.append(Heading(f"{run.name} ({run.method})", 3))
        if not groups:
            blocks.append(Para("No loss, reward, KL, entropy, accuracy or learning-rate values were logged."))
            continue
        title = f"{run.name}: " + ", ".join(groups)
        blocks.append(Figure(f"curves-{i}-{_slug(run.name)}.png", plots.training_curves(groups, title), title))
    return blocks


# ---- samples -------------------------------------------------------------------------------------------------


def _text(value) -> str:
    """A prompt or reference as text: a string, a chat as "role: content" lines, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in value)
    return json.dumps(value, ensure_ascii=False)


def _clip(text: str) -> str:
    """Surrounding whitespace and runs of empty lines dropped, cut after SAMPLE_CHARS characters."""
    text = re.sub(r"\n{3,}", "\n\n", text.strip())
    cut = len(text) - SAMPLE_CHARS
    return text if cut <= 0 else f"{text[:SAMPLE_CHARS]} … ({cut} more characters)"


def _generation(row: dict | None) -> str:
    if row is None:
        return "(no sample before)"
    completion, score = _text(row.get("completion")), row.get("score")
    shown = _clip(completion) if completion.strip() else f"(blank: {completion[:40]!r})" if completion else "(empty)"
    return shown + ("" if score is None else f"\n[score {_num(score)}]")


def _sample_row(pair: dict) -> list[Cell]:
    after, before = pair["after"], pair["before"]
    scores = (before or {}).get("score"), after.get("score")
    worse = None not in scores and scores[1] < scores[0]
    return [Cell(_clip(_text(after.get("prompt")))), Cell(_clip(_text(after.get("reference")))),
            Cell(_generation(before)), Cell(_generation(after), "bad" if worse else "")]


def _samples(runs: list[Run]) -> list:
    blocks = []
    for run in runs:
        for suite, pairs in run.samples.items():
            blocks.append(Heading(f"{run.name} ({run.method}): {suite}", 3))
            blocks.append(Table(["Prompt", "Reference", "Before", "After"], [_sample_row(p) for p in pairs],
                                long_text=True))
    return [Heading("Sample generations"), *blocks] if blocks else []


# ---- data ----------------------------------------------------------------------------------------------------


def _count(value) -> tuple[int, str]:
    """A count in the data report: a number, or {file: number} (then also the split by file)."""
    if isinstance(value, dict):
        return sum(value.values()), ", ".join(f"{f}: {n}" for f, n in value.items())
    return int(value), ""


def _reason_rows(data: dict) -> list[list[Cell]]:
    rows = []
    for kind, key in (("dropped", "dropped"), ("altered (kept)", "altered"), ("noted", "notes")):
        for reason, value in (data.get(key) or {}).items():
            n, split = _count(value)
            example = ((data.get("examples") or {}).get(reason) or [{}])[0]
            where = f"{example['file']}:{example['row']}: {example.get('detail', '')}" if "file" in example else ""
            rows.append([Cell(kind, "bad" if kind == "dropped" else ""), Cell(reason),
                         Cell(f"{n} ({split})" if split else str(n)), Cell(where)])
    return rows


def _data_blocks(i: int, run: Run) -> list:
    data = run.data
    read, kept = data.get("rows_read") or {}, data.get("rows_kept") or {}
    dropped = sum(_count(v)[0] for v in (data.get("dropped") or {}).values())
    blocks = [
        Heading(f"{run.name} ({run.method})", 3),
        Para(f"{sum(kept.values())} of {sum(read.values())} rows kept, {dropped} dropped."),
        Table(["File", "Rows read", "Rows kept"], [[Cell(f), Cell(str(n)), Cell(str(kept.get(f, 0)))]
                                                   for f, n in read.items()]),
    ]
    reasons = _reason_rows(data)
    if reasons:
        blocks.append(Table(["What", "Reason", "Rows", "Example"], reasons))
    lengths = data.get("lengths")
    if lengths and lengths.get("counts"):
        title = f"{run.name}: tokens per training example"
        png = plots.length_histogram(lengths["bins"], lengths["counts"], title)
        blocks.append(Figure(f"lengths-{i}-{_slug(run.name)}.png", png, title))
    return blocks


def _data(runs: list[Run]) -> list:
    blocks = [b for i, run in enumerate(runs) if run.data for b in _data_blocks(i, run)]
    return [Heading("Data"), *blocks] if blocks else []
