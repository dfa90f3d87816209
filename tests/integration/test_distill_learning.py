"""A student distilled from a better teacher beats the same student trained on the same wrongly labelled data.

What this shows, plainly: the teacher correcting wrong labels. The baseline's labels are wrong 60% of the time,
so the test shows that distillation learns the teacher's answers instead of the data's; it does not show
distillation beating SFT on clean labels (on this task it did not; docs/distill.md).

Task: "What is the largest of 4, 0, 8, 1?" (split-digit tiny model). The teacher is the tiny model after 120 SFT
steps on 2000 clean rows (0.95 right on held-out prompts, measured). The student's data are 512 rows labelled by a
careless annotator who gave the second largest digit 60% of the time: SFT on those labels learns the mistake,
while logit distillation (which never looks at the labels with hard_weight 0) and sequence-level distillation
(which replaces them with the teacher's answers) learn the teacher's answers. Same rows, same 120 steps, same
seed; held-out greedy exact match by the eval suite. Measured: SFT 0.27, logit 0.95, sequence 0.95.
On-policy distillation (GKD) from that SFT student, on the same prompts, takes it to 0.95 in 80 steps; its
control, the same student given the same 80 steps of more SFT on its rows, reaches 0.55. With training seeds 1
and 42 (docs/distill.md) GKD's gain was smaller (+0.25, +0.42), hence the bar of +0.2.
"""

import json
import random

import pytest

from posttrain.data.synthetic import make_prompt_rows, make_task_rows, write_jsonl
from posttrain.models.tiny import build_tiny_model
from tests.conftest import run

TASK = ("largest",)


def _careless(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """The rows with the second largest digit as the answer in about ``rate`` of them."""
    rng = random.Random(seed)
    for row in rows:
        if rng.random() < rate:
            digits = sorted(int(d) for d in row["messages"][0]["content"].rstrip("?").split(" of ")[1].split(", "))
            row["messages"][1]["content"] = str(digits[-2])
    return rows


def accuracy(run_dir) -> float:
    suites = json.loads((run_dir / "eval.json").read_text())["suites"]
    return suites[0]["after"]["exact_match"]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill-learning")
    rows = _careless(make_task_rows(512, seed=4, tasks=TASK), 0.6, seed=4)
    return {
        "root": root,
        "base": build_tiny_model(root / "tiny", split_digits=True),
        "clean": write_jsonl(make_task_rows(2000, seed=1, tasks=TASK), root / "clean.jsonl"),
        "labelled": write_jsonl(rows, root / "careless.jsonl"),
        "prompts": write_jsonl([{"prompt": r["messages"][0]["content"]} for r in rows], root / "prompts.jsonl"),
        "held_out": write_jsonl(make_prompt_rows(256, seed=6, tasks=TASK), root / "held_out.jsonl"),
    }


def stage(task, name: str, method: str, train, steps: int, **sections) -> dict:
    return {
        "model": {"name_or_path": str(task["base"])}, "method": method, "tuning": {"mode": "full"},
        "data": {"train": train, "max_seq_len": 64, "cache_dir": str(task["root"] / "cache")},
        "training": {"max_steps": steps, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10,
                     "logging_steps": 20, "progress_bar": False, "seed": 0},
        "eval": {"before": False, "suites": [{"name": "held_out", "type": "generation", "path": str(task["held_out"]),
                                              "max_new_tokens": 3, "batch_size": 128}]},
        "output_dir": str(task["root"] / name), **sections,
    }


@pytest.fixture(scope="module")
def teacher(task):
    cfg = stage(task, "teacher", "sft", str(task["clean"]), 120)
    cfg["data"]["packing"] = True
    cfg["training"]["lr_scheduler"] = "constant"
    final = run(cfg)
    assert accuracy(task["root"] / "teacher") >= 0.9
    return final


@pytest.fixture(scope="module")
def careless_sft(task):
    return run(stage(task, "sft", "sft", str(task["labelled"]), 120))


def test_distilled_students_beat_the_student_trained_on_the_same_labels(task, teacher, careless_sft):
    run(stage(task, "logit", "distill", str(task["labelled"]), 120, distill={"teacher": str(teacher)}))
    run(stage(task, "sequence", "distill", [{"path": str(task["prompts"]), "format": "prompt"}], 120,
              distill={"teacher": str(teacher), "mode": "sequence", "generation": {"max_new_tokens": 4}}))
    sft, logit, sequence = (accuracy(task["root"] / name) for name in ("sft", "logit", "sequence"))
    assert sft < 0.6, f"the careless labels should hold SFT back; got {sft:.3f}"
    assert logit >= 0.75 and logit >= sft + 0.25, (sft, logit)
    assert sequence >= 0.75 and sequence >= sft + 0.25, (sft, sequence)


def test_on_policy_distillation_corrects_the_student_on_its_own_answers(task, teacher, careless_sft):
    # GKD from the SFT student: it answers the same prompts itself and the teacher scores its answers.
    cfg = stage(task, "gkd", "distill", [{"path": str(task["prompts"]), "format": "prompt"}], 80,
                distill={"teacher": str(teacher), "mode": "on_policy", "loss": "jsd",
                         "generation": {"max_new_tokens": 4}})
    cfg["model"]["name_or_path"] = str(careless_sft)
    cfg["training"].update(learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant")
    run(cfg)
    # The control: the same student given the same 80 steps more of SFT on its own rows, with the same settings.
    control = stage(task, "sft-more", "sft", str(task["labelled"]), 80)
    control["model"]["name_or_path"] = str(careless_sft)
    control["training"].update(learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant")
    run(control)
    start, more, after = (accuracy(task["root"] / name) for name in ("sft", "sft-more", "gkd"))
    assert after >= start + 0.2 and after >= more + 0.2, (start, more, after)
