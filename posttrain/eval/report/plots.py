"""PNG charts drawn with matplotlib's Agg backend (imported lazily: only the report needs it)."""

from __future__ import annotations

import io
import itertools
import math

from posttrain.errors import PosttrainError

# Training-curve panels: a title and whether a metric key (without its "eval_" prefix) belongs in it.
# A key goes into the first panel that takes it.
CURVE_GROUPS = (
    ("accuracy", lambda k: "accuracy" in k or "exact_match" in k),
    ("loss", lambda k: k == "loss" or k.startswith("loss/")),  # loss/<task>: per-task curves beside the total
    ("reward", lambda k: k in ("reward", "rewards/margin") or k.startswith("reward/")),
    ("KL", lambda k: k == "kl" or k.startswith("kl/")),
    ("entropy", lambda k: k == "entropy"),
    ("learning rate", lambda k: k == "lr"),
)
PANEL_COLUMNS = 3
BEFORE_COLOR, AFTER_COLOR = "#9aa5b1", "#2f6fb0"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PosttrainError("the report draws its charts with matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def curve_groups(metrics: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{panel: {metric: [(step, value)]}} for the panels that have data, in CURVE_GROUPS order."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {title: {} for title, _ in CURVE_GROUPS}
    for record in metrics:
        for key, value in record.items():
            title = _group_of(key)
            if title is not None:
                groups[title].setdefault(key, []).append((record["step"], value))
    return {title: series for title, series in groups.items() if series}


def _group_of(key: str) -> str | None:
    base = key.removeprefix("eval_")
    return next((title for title, takes in CURVE_GROUPS if takes(base)), None)


def training_curves(groups: dict[str, dict[str, list[tuple[float, float]]]], title: str) -> bytes:
    plt = _pyplot()
    cols = min(PANEL_COLUMNS, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, groups.items()):
        for key, points in series.items():
            steps, values = zip(*points)
            style = {"marker": "o", "markersize": 3, "linestyle": "--"} if key.startswith("eval_") else {}
            ax.plot(steps, values, label=key, linewidth=1.4, **style)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def suite_bars(stages: list[str], before: list[float | None], after: list[float | None], metric: str,
               title: str) -> bytes:
    """Bars of a suite's primary metric per stage: before (start model) and after training."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 * len(stages) + 2), 3.4))
    width = 0.38
    xs = range(len(stages))
    for offset, values, label, color in ((-width / 2, before, "before", BEFORE_COLOR),
                                         (width / 2, after, "after", AFTER_COLOR)):
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar([x + offset for x in xs], heights, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.3g}" if v is not None else "n/a" for v in values], fontsize=8)
    ax.set_xticks(list(xs), stages)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def length_histogram(edges: list[float], counts: list[int], title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=AFTER_COLOR, edgecolor="white")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)
