"""Run a pipeline: skip the stages already done with the same fingerprint, resume an interrupted one, run the rest.

A stage's fingerprint covers what decides its weights: its resolved config (without eval, logging and
progress settings), the bytes of every file it names, a summary of every outside folder it names (file
names, sizes and modification times: hashing a 15 GB checkpoint on every run would cost more than it
saves), and the fingerprints of the stages it reads. A change upstream therefore re-runs everything
downstream. The eval section has its own fingerprint: changing only the suites re-evaluates the stage
without training it again.

State lives in OUTPUT_DIR/pipeline_state.json (written atomically after every change). A stage whose
folder holds a run from another fingerprint is moved to OUTPUT_DIR/superseded/ rather than deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.io import atomic_write_text
from posttrain.pipeline.spec import Pipeline, Stage

STATE_FILE = "pipeline_state.json"
STATE_VERSION = 1
DONE = ("completed", "early_stopped")
# Settings that change what is shown, not what is trained.
_COSMETIC = {"training": ("progress_bar", "logging_steps", "report_to"), "data": ("cache_dir",)}
_HASH_FILES_UP_TO = 1 << 30  # bytes; larger files are summarised by size and modification time


@dataclass
class Step:
    """What the pipeline will do with one stage."""

    stage: Stage
    action: str  # "skip", "evaluate" (only the eval section changed), "resume", "run"
    fingerprint: str
    eval_fingerprint: str | None
    reason: str


def stage_fingerprints(stage: Stage, upstream: dict[str, str]) -> tuple[str, str | None]:
    """(training fingerprint, eval fingerprint or None when the stage has no eval section)."""
    cfg = stage.config.model_dump(mode="json")
    evaluation = cfg.pop("eval", None)
    cfg.pop("output_dir", None)
    for section, keys in _COSMETIC.items():
        for key in keys:
            cfg.get(section, {}).pop(key, None)
    root = stage.output_dir.parent
    finals = {str((root / name / "final").resolve()): name for name in upstream}
    train = {"version": STATE_VERSION, "config": cfg, "inputs": _inputs(cfg, finals, upstream),
             "upstream": {n: upstream[n] for n in stage.depends_on}}
    train_fp = _digest(train)
    if evaluation is None:
        return train_fp, None
    return train_fp, _digest({"eval": evaluation, "inputs": _inputs(evaluation, finals, upstream), "train": train_fp})


def plan(pipeline: Pipeline, *, force: bool = False) -> list[Step]:
    """What running the pipeline now would do, stage by stage (nothing is written)."""
    state = read_state(pipeline.output_dir)
    fps: dict[str, str] = {}
    steps = []
    training: set[str] = set()  # stages that will train: whatever reads their output must train again too
    for stage in pipeline.stages:
        fp, efp = stage_fingerprints(stage, fps)
        fps[stage.name] = fp
        step = _decide(stage, fp, efp, state.get(stage.name) or {}, force)
        stale = [d for d in stage.depends_on if d in training]
        if stale and step.action in ("skip", "evaluate"):
            # Same config, but its input is being made again (e.g. that stage's final/ was deleted).
            step = Step(stage, "run", fp, efp, f"stage {stale[0]}, whose output it reads, runs again")
        if step.action in ("run", "resume"):
            training.add(stage.name)
        steps.append(step)
    return steps


def _decide(stage: Stage, fp: str, efp: str | None, saved: dict, force: bool) -> Step:
    out = stage.output_dir
    info = _json(out / "run.json") or {}
    same = saved.get("fingerprint") == fp
    if force:
        return Step(stage, "run", fp, efp, "--force")
    if same and info.get("status") in DONE and stage.final.is_dir():
        if efp is not None and saved.get("eval_fingerprint") != efp:
            return Step(stage, "evaluate", fp, efp, "trained; its eval section changed")
        return Step(stage, "skip", fp, efp, "done with the same config and inputs")
    checkpoints = _checkpoints(out) if same else []
    if checkpoints:
        return Step(stage, "resume", fp, efp, f"interrupted; resuming from {checkpoints[-1].name}")
    if not out.exists() or not any(out.iterdir()):
        return Step(stage, "run", fp, efp, "not run yet")
    if same:
        return Step(stage, "run", fp, efp, "interrupted before its first checkpoint; starting again")
    return Step(stage, "run", fp, efp, "its config or inputs changed" if saved else "its folder holds another run")


def run_pipeline(pipeline: Pipeline, *, force: bool = False, only: list[str] | None = None, log=print) -> list[Step]:
    """Run (or skip, resume, re-evaluate) every stage in order, then write one report over all of them."""
    from posttrain.trainers.stage import run_stage

    steps = plan(pipeline, force=force)
    if only:
        for name in only:
            pipeline.stage(name)  # a clear error for a wrong name
        _check_inputs_ready(steps, only)
    main = int(os.environ.get("RANK", "0")) == 0
    stage_log = log
    log = log if main else (lambda *a, **k: None)  # run_stage filters its own lines by process
    state = read_state(pipeline.output_dir)
    for i, step in enumerate(steps, 1):
        stage = step.stage
        head = f"[{i}/{len(steps)}] {stage.name} ({stage.config.method})"
        if only and stage.name not in only:
            log(f"{head}: not selected (--only)")
            continue
        if step.action == "skip":
            log(f"{head}: skipped, {step.reason}")
            continue
        log(f"{head}: {step.reason}")
        if step.action == "evaluate":
            _reevaluate(stage, log)
        else:
            resume = step.action == "resume"
            if not resume and main:
                _set_aside(pipeline.output_dir, stage, log)
            state[stage.name] = {"fingerprint": step.fingerprint, "eval_fingerprint": None, "status": "running",
                                 "started": _now()}
            if main:
                write_state(pipeline.output_dir, state)
            t0 = time.time()
            try:
                run_stage(stage.config, resume=resume, overwrite=not resume, log=stage_log)
            except BaseException:
                state[stage.name]["status"] = "interrupted"
                if main:
                    write_state(pipeline.output_dir, state)
                log(f"{head}: stopped. Run the same command again to resume it from its last checkpoint.")
                raise
            state[stage.name]["seconds"] = round(time.time() - t0, 1)
        state[stage.name].update(status="done", eval_fingerprint=step.eval_fingerprint, ended=_now())
        if main:
            write_state(pipeline.output_dir, state)
    if pipeline.report and main:
        _report(pipeline, log)
    return steps


def _check_inputs_ready(steps: list[Step], only: list[str]) -> None:
    """--only: every stage the selected ones read must already be done."""
    by_name = {s.stage.name: s for s in steps}
    for name in only:
        for dep in by_name[name].stage.depends_on:
            if dep not in only and by_name[dep].action != "skip":
                raise PosttrainError(
                    f"--only {name}: it reads stage {dep}'s output, which is not done with its current config "
                    f"({by_name[dep].reason}); run {dep} too (add --only {dep}) or drop --only"
                )


def _reevaluate(stage: Stage, log) -> None:
    from posttrain.eval.runner import run_eval

    start = stage.config.model.name_or_path
    before = start if stage.config.eval.before else None
    run_eval(stage.config, model_path=str(stage.final), compare=before, out_dir=stage.output_dir, log=log)


def _set_aside(root: Path, stage: Stage, log) -> None:
    """Move a folder that holds another run (or an unfinished one) under superseded/: never delete it."""
    out = stage.output_dir
    if not out.exists() or not any(out.iterdir()):
        return
    dest = root / "superseded" / f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    out.rename(dest)
    log(f"  the previous contents of {out} were moved to {dest} (delete it to free the space)")


def _report(pipeline: Pipeline, log) -> None:
    from posttrain.eval.report import write_report

    runs = [s.output_dir for s in pipeline.stages if (s.output_dir / "metrics.jsonl").is_file()]
    if not runs:
        return
    html, md = write_report(runs, out_dir=pipeline.output_dir, title=f"Pipeline {pipeline.name}")
    log(f"report: {html} (markdown: {md})")


def read_state(root: Path) -> dict:
    data = _json(Path(root) / STATE_FILE)
    if not data:
        return {}
    if data.get("version") != STATE_VERSION:
        return {}  # an older layout: every stage is checked afresh
    return data.get("stages", {})


def write_state(root: Path, stages: dict) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(root) / STATE_FILE, json.dumps({"version": STATE_VERSION, "stages": stages}, indent=2))


def format_plan(steps: list[Step]) -> str:
    width = max(len(s.stage.name) for s in steps)
    lines = [f"{'stage':<{width}}  {'method':<10}  {'action':<8}  why"]
    for s in steps:
        lines.append(f"{s.stage.name:<{width}}  {s.stage.config.method:<10}  {s.action:<8}  {s.reason}")
    return "\n".join(lines)


def _inputs(node, finals: dict[str, str], upstream: dict[str, str]) -> dict:
    """A digest of every file or folder that a string value in ``node`` names."""
    found: dict[str, str] = {}
    for value in _strings(node):
        if value in found or len(value) > 4096:
            continue
        try:
            path = Path(value)
            key = str(path.resolve())
            is_file, is_dir = path.is_file(), path.is_dir()
        except (OSError, ValueError):
            continue
        if key in finals:  # an earlier stage's output, whether or not it exists yet
            found[value] = f"stage:{upstream[finals[key]]}"
        elif is_dir:
            found[value] = _folder_summary(path)
        elif is_file:
            found[value] = _file_digest(path)
    return found


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _file_digest(path: Path) -> str:
    from posttrain.data.dataset import file_digest

    st = path.stat()
    if st.st_size > _HASH_FILES_UP_TO:
        return f"size:{st.st_size}:mtime:{st.st_mtime_ns}"
    return file_digest(str(path))


def _folder_summary(path: Path) -> str:
    parts = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _checkpoints(out: Path) -> list[Path]:
    from posttrain.trainers.loop import list_checkpoints

    return [path for _, path in list_checkpoints(out / "checkpoints")]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
