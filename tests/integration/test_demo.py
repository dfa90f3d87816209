"""The demo, shortened (a few steps per stage), end to end: every stage runs, is evaluated and is in the report."""

import json
import re

STAGES = ("pretrain", "sft", "dpo", "simpo", "orpo", "kto", "grpo", "rft", "ppo")


def test_quick_demo_runs_every_stage_and_reports_it(tmp_path):
    from posttrain.demo import run_demo

    lines = []
    html = run_demo(tmp_path / "demo", quick=True, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert html.is_file() and (tmp_path / "demo" / "report.md").is_file()
    text = html.read_text()
    for stage in STAGES:
        record = json.loads((tmp_path / "demo" / stage / "eval.json").read_text())
        heldout = next(s for s in record["suites"] if s["name"] == "heldout")
        assert isinstance(heldout["after"]["exact_match"], float), stage
        assert stage in text
    # The closing table names every evaluated stage with its numbers.
    table = lines[-1]
    for stage in STAGES:
        assert re.search(rf"\| {stage} \| [-0-9.]+ -> [0-9.]+ \|", table), (stage, table)
    assert (tmp_path / "demo" / "reward" / "final" / "config.json").is_file()
