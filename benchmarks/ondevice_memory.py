"""Peak resident memory of LoRA training on CPU over a float base vs a torchao int8 base (``model.quantize``).

    python benchmarks/ondevice_memory.py [--hidden 512 --layers 6 --steps 4 --batch-size 4 --seq-len 128]

Builds a Llama locally (no download) and synthetic data, then runs the same LoRA stage in fresh processes, one
per setting, alternating them ``--repeats`` times, and prints each run's ``peak_rss_mb`` (from run.json: the
process's VmHWM on Linux, so the Python and torch runtime count too) and the ratio int8 / none. A ratio above 1
means the int8 base costs memory instead of saving it (see docs/on-device.md for why, and the figures measured).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    from posttrain.data.synthetic import make_task_rows, write_jsonl
    from posttrain.models.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="ondevice-memory-"))
    model = build_tiny_model(root / "model", hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4,
                             vocab_size=1024, max_position=max(1024, args.seq_len), tie_embeddings=False)
    train = write_jsonl(make_task_rows(args.batch_size * args.steps * 2, seed=0), root / "train.jsonl")
    peaks: dict[str, list[float]] = {"none": [], "int8": []}
    for _ in range(args.repeats):
        for quantize in peaks:
            config = {
                "model": {"name_or_path": str(model), "quantize": quantize, "dtype": "float32"},
                "method": "sft", "tuning": {"mode": "lora", "lora": {"r": 8, "alpha": 16}},
                "data": {"train": str(train), "max_seq_len": args.seq_len, "cache_dir": str(root / "cache")},
                "training": {"max_steps": args.steps, "batch_size": args.batch_size, "progress_bar": False},
                "output_dir": str(root / f"run-{quantize}"),
            }
            path = root / f"{quantize}.yaml"
            path.write_text(yaml.safe_dump(config))
            done = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path), "--overwrite"],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"model.quantize={quantize} failed:\n{done.stderr[-3000:]}")
            run = json.loads((root / f"run-{quantize}" / "run.json").read_text())
            peaks[quantize].append(run["peak_rss_mb"])
            print(f"model.quantize={quantize}: peak RSS {run['peak_rss_mb']:.0f} MiB", flush=True)
    none, int8 = min(peaks["none"]), min(peaks["int8"])
    print(f"lowest peak: none {none:.0f} MiB, int8 {int8:.0f} MiB, ratio int8/none {int8 / none:.2f}")


if __name__ == "__main__":
    main()
