"""Peak memory of full DPO: reference log-probs precomputed vs a live frozen reference copy.

    python benchmarks/dpo_reference_memory.py [--hidden 512 --layers 8 --steps 10 --batch-size 8]

Builds a model locally (no download), writes synthetic preference pairs, then runs the same
DPO stage in fresh processes, alternating the two reference modes ``--repeats`` times, and
prints each run's peak memory and the ratio precomputed / live. On a GPU the peak is
``torch.cuda.max_memory_allocated``; on CPU it is the process's peak resident set size
(which includes the Python and torch runtime, so the ratio understates the saving; the
difference is the reference copy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(config_path: str) -> None:
    """Run one stage and print its peak memory as JSON on the last line."""
    import torch

    from posttrain.config import load_config
    from posttrain.trainers.stage import run_stage

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_stage(load_config(config_path), overwrite=True, log=lambda *a, **k: None)
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    print(json.dumps({"peak_bytes": peak, "kind": kind}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child)
        return

    import yaml

    from posttrain.data.synthetic import make_preference_rows, write_jsonl
    from posttrain.models.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    model = build_tiny_model(work / "model", layers=args.layers, hidden=args.hidden, heads=8, kv_heads=4,
                             vocab_size=args.vocab_size, tie_embeddings=False)
    data = write_jsonl(make_preference_rows(args.pairs, seed=0), work / "pairs.jsonl")
    results: dict[str, list[int]] = {"live": [], "precomputed": []}
    kind = ""
    for r in range(args.repeats):
        for mode in ("live", "precomputed"):
            cfg = {
                "model": {"name_or_path": str(model)}, "method": "dpo", "tuning": {"mode": "full"},
                "data": {"train": [{"path": str(data), "format": "preference"}], "max_seq_len": 128,
                         "cache_dir": str(work / f"cache-{r}-{mode}")},
                "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-5,
                             "progress_bar": False, "logging_steps": args.steps},
                "preference": {"reference": mode},
                "output_dir": str(work / f"run-{mode}"),
            }
            path = work / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode != 0:
                sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode].append(out["peak_bytes"])
            kind = out["kind"]
            print(f"repeat {r + 1} {mode:>11}: {out['peak_bytes'] / 2**20:8.1f} MiB ({kind})", flush=True)
    live, pre = min(results["live"]), min(results["precomputed"])
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        weights = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    print(f"model: {args.layers} layers, hidden {args.hidden}, weights {weights / 2**20:.1f} MiB")
    print(f"peak memory, best of {args.repeats}: live reference {live / 2**20:.1f} MiB, "
          f"precomputed {pre / 2**20:.1f} MiB, difference {(live - pre) / 2**20:.1f} MiB")
    print(f"ratio precomputed / live: {pre / live:.3f}")


if __name__ == "__main__":
    main()
