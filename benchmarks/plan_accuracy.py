"""The planner's predicted peak memory against the measured peak of real training steps, mode by mode.

    python benchmarks/plan_accuracy.py [--models tiny,48m] [--modes full,lora,...] [--checkpointing] [--full-logits]

For each model (built locally: the tiny model, and 12 blocks of hidden 512 = 47.7M parameters) and each
tuning mode, it predicts the peak of a step with ``posttrain.plan`` (shapes read from the config on the meta
device) and measures two real steps of posttrain's Trainer on CPU with ``posttrain.plan.measure`` (the peak of
live tensor bytes, not RSS: see docs/plan.md), then prints both and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

MODELS = {
    "tiny": {"shape": {}, "seq_len": 64, "batch_size": 4},
    "48m": {"shape": {"layers": 12, "hidden": 512, "heads": 8, "kv_heads": 4}, "seq_len": 32, "batch_size": 2},
}
ALL_MODES = ("full", "freeze", "lora", "dora", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2", "bottleneck")


def tuning_for(mode: str):
    from posttrain.config import TuningConfig

    if mode == "dora":
        return TuningConfig(mode="lora", lora={"use_dora": True})
    return TuningConfig(mode=mode, freeze={"train_top_layers": 1})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,48m", help="comma-separated: tiny, 48m")
    p.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated tuning modes (dora = LoRA + DoRA)")
    p.add_argument("--seq-len", type=int, help="override each model's default (tiny 64, 48m 32)")
    p.add_argument("--batch-size", type=int, help="override each model's default (tiny 4, 48m 2)")
    p.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    p.add_argument("--full-logits", action="store_true", help="training.chunked_head: false")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    from posttrain.models.tiny import build_tiny_model
    from posttrain.plan.measure import measure_training_steps
    from posttrain.plan.memory import Settings, estimate
    from posttrain.plan.shape import architecture, empty_model, mode_shape, read_config

    work = Path(tempfile.mkdtemp(prefix="posttrain-plan-bench-"))
    print(f"{'model':<6}{'mode':<12}{'seq x batch':>12}{'predicted MiB':>15}{'measured MiB':>14}{'ratio':>8}"
          f"{'seconds':>9}")
    for name in args.models.split(","):
        spec = MODELS[name]
        model_dir = build_tiny_model(work / name, **spec["shape"])
        seq, batch = args.seq_len or spec["seq_len"], args.batch_size or spec["batch_size"]
        config = read_config(str(model_dir))
        meta = empty_model(config)
        arch = architecture(meta, config, str(model_dir))
        for mode in args.modes.split(","):
            if mode in ("prefix", "ptuning_v2") and args.checkpointing:
                continue  # refused by the config: the prefix lives in the cache checkpointed blocks drop
            tuning = tuning_for(mode)
            settings = Settings(seq, batch, mixed_precision="no", device="cpu", chunked_head=not args.full_logits)
            e = estimate(arch, mode_shape(meta, mode, tuning), settings)
            want = e.total_checkpointed if args.checkpointing else e.total
            started = time.perf_counter()
            got = measure_training_steps(model_dir, tuning, seq, batch, gradient_checkpointing=args.checkpointing,
                                         chunked_head=not args.full_logits)
            print(f"{name:<6}{mode:<12}{f'{seq} x {batch}':>12}{want / 2**20:>15.2f}{got.peak / 2**20:>14.2f}"
                  f"{want / got.peak:>8.3f}{time.perf_counter() - started:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
