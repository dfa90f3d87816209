"""``posttrain report``: one self-contained HTML page and a Markdown twin over one or more run directories.

The HTML embeds its charts as base64 PNGs and needs nothing from the network; the Markdown links the same
PNGs, written to ``report_files/`` beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.io import atomic_dir, atomic_write_text
from posttrain.eval.report.document import render_html, render_markdown
from posttrain.eval.report.runs import load_run
from posttrain.eval.report.sections import build_document

FILES_DIR = "report_files"

__all__ = ["write_report"]


def write_report(run_dirs: list[Path], out_dir: Path | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md (default folder: the run directory, or the runs' common parent)."""
    if not run_dirs:
        raise PosttrainError("no run directory given")
    runs = [load_run(Path(d)) for d in run_dirs]
    out = Path(out_dir) if out_dir is not None else _default_out([r.path for r in runs])
    doc = build_document(runs, title or "Training report: " + ", ".join(r.name for r in runs))
    markdown, files = render_markdown(doc, FILES_DIR)
    with atomic_dir(out / FILES_DIR) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    md = atomic_write_text(out / "report.md", markdown)
    html = atomic_write_text(out / "report.html", render_html(doc))
    return html, md


def _default_out(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0]
    return Path(os.path.commonpath([p.resolve() for p in paths]))
