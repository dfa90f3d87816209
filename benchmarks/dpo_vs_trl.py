"""DPO throughput and peak memory: posttrain vs TRL's DPOTrainer, with a live reference model and with reference
log-probs precomputed, side by side.

    pip install -e '.[bench]'
    python benchmarks/dpo_vs_trl.py [--model tiny|30m|qwen2.5-0.5b|qwen2.5-1.5b] [--steps 30] [--batch-size 8]
                                    [--max-len 512] [--repeats 2]

Full fine-tuning; same model, pairs (chosen and rejected of varied lengths), sequence length, batch, beta and steps
for every contender, alternating in fresh processes. Only the training loop is timed: precomputing reference
log-probs happens before it for both tools (each precomputes the whole training set, which has exactly
steps x batch pairs). Printed: non-padding tokens per second of the policy's training forwards, peak memory during
training, and the ratios posttrain / TRL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# "full head": posttrain with training.chunked_head=false, to measure that means on its own.
CONTENDERS = ("posttrain live", "TRL live", "posttrain precomputed", "TRL precomputed",
              "posttrain precomputed full head")
DEFAULT = CONTENDERS[:4]


def _trl_child(spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    a = spec["args"]
    tokenizer, model, rows, gpu = common.trl_inputs(spec)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(
        output_dir=spec["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch_size"],
        learning_rate=a["lr"], max_length=a["max_len"], beta=0.1, logging_steps=a["steps"], save_strategy="no",
        report_to="none", use_cpu=not gpu, bf16=gpu, lr_scheduler_type="cosine", warmup_steps=0, seed=0,
        precompute_ref_log_probs=spec["reference"] == "precomputed", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    meter = common.Meter(trainer.model, tokenizer.pad_token_id)
    with meter:
        trainer.train()
    return meter.result()


def _posttrain_config(spec: dict) -> dict:
    a = spec["args"]
    return {
        "model": {"name_or_path": spec["model"], "dtype": "float32"},
        "method": "dpo",
        "tuning": {"mode": "full"},
        "data": {"train": [{"path": spec["data"], "format": "preference"}], "max_seq_len": a["max_len"],
                 "cache_dir": spec["out"] + "-cache"},
        "training": {"max_steps": a["steps"], "batch_size": a["batch_size"], "learning_rate": a["lr"],
                     "logging_steps": a["steps"], "progress_bar": False, "save_total_limit": 1,
                     "mixed_precision": "bf16" if a["model"] in common.GPU_MODELS else "no",
                     "chunked_head": spec.get("chunked_head", True)},
        "preference": {"reference": spec["reference"], "dpo": {"beta": 0.1}},
        "output_dir": spec["out"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="30m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=CONTENDERS, help="run only these contenders")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        ours = spec["contender"].startswith("posttrain")
        print(json.dumps(common.posttrain_child(_posttrain_config(spec)) if ours else _trl_child(spec)))
        return

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-dpo-"))
    model = common.build_model(args.model, work / "model")
    rows = common.preference_rows(args.steps * args.batch_size, seed=0, long=args.max_len // 3)
    data = common.write_jsonl(rows, work / "pairs.jsonl")
    words = sorted(len(r["chosen"].split()) for r in rows)
    print(f"model {args.model} (full), {len(rows)} pairs: chosen words median {words[len(words) // 2]}, "
          f"p90 {words[len(words) * 9 // 10]}, max {words[-1]}; max_len {args.max_len}, batch {args.batch_size}, "
          f"{args.steps} steps, {args.repeats} repeats")
    contenders = args.only or DEFAULT

    def spec_for(name: str, r: int) -> dict:
        return {"contender": name, "args": vars(args), "model": str(model), "data": str(data),
                "reference": "live" if "live" in name else "precomputed",
                "chunked_head": not name.endswith("full head"), "out": str(work / f"run-{r}-{name.replace(' ', '-')}")}

    results = common.alternate(__file__, contenders, args.repeats, spec_for, work)
    pairs = [(a, b) for a, b in (("posttrain live", "TRL live"), ("posttrain precomputed", "TRL precomputed"),
                                 ("posttrain precomputed", "TRL live"),
                                 ("posttrain precomputed", "posttrain precomputed full head"))
             if a in results and b in results]
    common.print_table(f"DPO full, model {args.model} (median of {args.repeats})", common.summarise(results), pairs)


if __name__ == "__main__":
    main()
