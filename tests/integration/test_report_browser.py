"""The report renders in headless Chromium without errors and every chart loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from posttrain.eval.report import write_report
from tests.report_runs import three_stages

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "report_screenshot.py"


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("report_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_in_chromium_without_errors(tmp_path):
    shot = _screenshot_module()
    if not Path(shot.CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {shot.CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Python playwright is not installed (pip install playwright)")
    html, _ = write_report(three_stages(tmp_path / "runs"))
    result = shot.check_report(html, tmp_path / "report.png")
    assert result["console_errors"] == [] and result["page_errors"] == []
    assert result["images"] == 8 and result["broken_images"] == []
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
