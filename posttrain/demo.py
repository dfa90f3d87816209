"""The embedded default: a short SFT of a locally built tiny model on a synthetic task, on CPU.

Run as ``python -m posttrain.demo [OUT]``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_demo(out: str | Path, steps: int = 150) -> Path:
    from posttrain.config import load_config
    from posttrain.data.synthetic import write_jsonl
    from posttrain.data.synthetic.tasks import make_task_rows, split_train_test
    from posttrain.models.tiny import build_tiny_model
    from posttrain.trainers.stage import run_stage

    out = Path(out)
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, layers=2, hidden=128, heads=4, kv_heads=2, seed=0, overwrite=True)
    rows = make_task_rows(1200, seed=0)
    train, test = split_train_test(rows, 0.1, seed=0)
    write_jsonl(train, out / "data" / "train.jsonl")
    write_jsonl(test, out / "data" / "eval.jsonl")
    cfg = load_config(None, raw={
        "model": {"name_or_path": str(model_dir)},
        "method": "sft",
        "tuning": {"mode": "full"},
        "data": {"train": str(out / "data" / "train.jsonl"), "eval": str(out / "data" / "eval.jsonl"),
                 "max_seq_len": 128, "packing": True, "cache_dir": str(out / "cache")},
        "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 10,
                     "logging_steps": 10, "eval_steps": 50, "seed": 0},
        "output_dir": str(out / "sft"),
    })
    final = run_stage(cfg, overwrite=True)
    metrics = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    print(f"\neval loss: {evals[0]:.3f} (step {metrics[0]['step']}) -> {evals[-1]:.3f} (end)")
    print(f"results: {out / 'sft'} (metrics.jsonl, run.json, final/)")
    return final


if __name__ == "__main__":
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
