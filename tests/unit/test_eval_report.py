"""posttrain report: content, self-containment, real images, plain verdicts and clear errors."""

from __future__ import annotations

import base64
import io
import re
import struct
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.eval.report import write_report
from posttrain.eval.report.plots import curve_groups
from posttrain.eval.report.sections import verdict
from tests.report_runs import generation, make_run, three_stages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    html, md = write_report(three_stages(root), title="Demo report")
    assert html == root / "report.html" and md == root / "report.md"  # the runs' common parent
    return html, md


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_png(data: bytes) -> None:
    from PIL import Image

    width, height = _png_size(data)
    assert width > 50 and height > 50
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.size == (width, height)


def _eval_row(html: str, stage: str) -> str:
    rows = re.findall(r"<tr>.*?</tr>", html)
    return next(r for r in rows if r.startswith(f"<tr><td>{stage}</td>") and "→" in r)


def test_report_written_beside_the_runs_names_every_stage_and_suite_number(report):
    html = report[0].read_text()
    assert "<title>Demo report</title>" in html
    for stage in ("sft", "dpo", "grpo"):
        assert f"<td>{stage}</td>" in html
    for number in ("0.12", "0.73", "40.1", "41", "0.7", "48.5", "+0.61", "-0.03", "+7.5"):
        assert number in html, number
    assert "2m 5s" in html  # duration from run.json
    assert "models/before-dpo" in html  # start model from config.yaml


def test_html_embeds_real_pngs_and_references_nothing_outside(report):
    html = report[0].read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    # 2 suite charts + 3 runs of training curves + 3 length histograms
    assert len(images) == len(re.findall(r"<img\b", html)) == 8
    for data in images:
        _check_png(base64.b64decode(data, validate=True))
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"<(?:script|link|iframe)\b", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html


def test_markdown_links_existing_pngs(report):
    md_path = report[1]
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 8
    for link in links:
        assert not link.startswith("/")
        _check_png((md_path.parent / link).read_bytes())
    assert "| sft | sft | 0.12 → 0.73 (+0.61, better)" in md


def test_a_suite_that_got_worse_is_said_plainly(report):
    html = report[0].read_text()
    dpo = _eval_row(html, "dpo")
    assert 'class="bad">0.73 → 0.7 (-0.03, WORSE)</td>' in dpo
    assert "better" not in dpo
    assert 'class="good">0.12 → 0.73 (+0.61, better)</td>' in _eval_row(html, "sft")
    assert "dpo (dpo) did not improve heldout: exact_match 0.73 → 0.7 (worse)." in html
    assert "sft (sft) did not improve heldout" not in html
    assert "sft (sft) did not improve general: perplexity 40.1 → 41 (worse)." in html  # within the threshold


def test_forgetting_regression_is_flagged_in_words_and_colour(report):
    html, md = report[0].read_text(), report[1].read_text()
    assert re.search(r'class="bad">⚠ FORGETTING: general perplexity 41 → 48.5, 18.3% worse \(over the threshold '
                     r"10%\)</td>", _eval_row(html, "dpo"))
    assert "ok: general perplexity 40.1 → 41, 2.2% worse (threshold 10%)" in _eval_row(html, "sft")
    assert "**⚠ FORGETTING: general perplexity 41 → 48.5" in md


def test_samples_side_by_side_and_escaped(report):
    html, md = report[0].read_text(), report[1].read_text()
    assert "<b>7</b>" not in html and "<b>7</b>" not in md
    assert "&lt;b&gt;7&lt;/b&gt; &amp; done\nsecond line" in html  # line break kept (pre-wrap cell)
    assert "&lt;b&gt;7&lt;/b&gt; &amp; done<br>second line" in md
    row = next(r for r in re.findall(r"<tr>.*?</tr>", html, re.DOTALL) if "What is 1 + 1?" in r)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
    assert cells[1:3] == ["2", "5\n[score 0]"]  # reference, then the same prompt's answer before training
    assert cells[3].startswith("&lt;b&gt;7") and cells[3].endswith("[score 1]")
    # the after answer that lost its point is marked
    assert re.search(r'<td class="bad long">8\n\[score 0\]</td>', html)
    assert '<td class="long">(blank: &#x27;\\n\\n\\n&#x27;)\n[score 0]</td>' in html  # empty lines, named
    assert "6" * 600 + " … (400 more characters)\n[score 0]</td>" in html and "6" * 601 not in html


def test_data_section_shows_rows_reasons_and_lengths(report):
    md = report[1].read_text()
    assert "123 of 130 rows kept, 7 dropped." in md
    assert "| **dropped** | too long | 4 | train.jsonl:17: 300 tokens &gt; max_seq_len=96 |" in md
    assert "| **dropped** | schema error | 3 (train.jsonl: 3) |  |" in md
    assert "| altered (kept) | truncated | 2 |  |" in md
    assert "(report_files/lengths-0-sft.png)" in md


def test_training_curves_group_metrics_and_skip_empty_groups():
    metrics = [
        {"step": 1.0, "loss": 2.0, "lr": 1e-3, "kl": 0.1, "grad_norm": 1.0, "rewards/accuracy": 0.5},
        {"step": 2.0, "eval_loss": 1.9, "eval_reward/exact": 0.3, "eval_rewards/accuracy": 0.6,
         "eval_exact_match": 0.2},
    ]
    groups = curve_groups(metrics)
    assert list(groups) == ["accuracy", "loss", "reward", "KL", "learning rate"]  # no entropy logged
    assert set(groups["accuracy"]) == {"rewards/accuracy", "eval_rewards/accuracy", "eval_exact_match"}
    assert groups["loss"] == {"loss": [(1.0, 2.0)], "eval_loss": [(2.0, 1.9)]}
    assert list(groups["reward"]) == ["eval_reward/exact"]


@pytest.mark.parametrize("before, after, higher, word", [
    (0.1, 0.2, True, "better"), (0.2, 0.1, True, "worse"), (0.2, 0.2, True, "no gain"),
    (40.0, 41.0, False, "worse"), (41.0, 40.0, False, "better"), (None, 0.5, True, None),
])
def test_verdict(before, after, higher, word):
    assert verdict(before, after, higher) == word


def test_single_run_without_eval_and_a_suite_without_before(tmp_path):
    plain = make_run(tmp_path, "pretrain", "pretrain")
    html, md = write_report([plain])
    assert html == plain / "report.html" and md == plain / "report.md"
    assert "Evaluation" not in html.read_text() and "Sample generations" not in html.read_text()
    fresh = make_run(tmp_path, "fresh", "sft", suites=[generation(None, 0.5)])
    text = write_report([fresh], out_dir=tmp_path / "out")[0].read_text()
    assert "0.5 (no before)" in text
    assert "not measured" in text  # no forgetting record


def test_rewriting_replaces_stale_images(tmp_path):
    run = make_run(tmp_path, "sft", "sft")
    write_report([run])
    (run / "report_files" / "stale.png").write_bytes(b"old")
    write_report([run])
    assert not (run / "report_files" / "stale.png").exists()


def test_cli_writes_the_report_and_prints_its_paths(tmp_path, capsys):
    run = make_run(tmp_path, "sft", "sft")
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--title", "T"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "rep" / "report.html") in out and str(tmp_path / "rep" / "report.md") in out
    assert "<h1>T</h1>" in (tmp_path / "rep" / "report.html").read_text()


def test_cli_errors_are_one_clear_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: run directory {tmp_path / 'nope'} does not exist\n"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "is not a training run directory: it has no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(PosttrainError, match="no run directory"):
        write_report([])


def test_broken_eval_json_is_a_clear_error(tmp_path):
    run = make_run(tmp_path, "sft", "sft")
    (run / "eval.json").write_text("{not json")
    with pytest.raises(PosttrainError, match="eval.json is not valid JSON"):
        write_report([run])
