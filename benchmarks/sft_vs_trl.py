"""SFT throughput and peak memory: posttrain vs TRL's SFTTrainer (with peft for LoRA), side by side.

    pip install -e '.[bench]'
    python benchmarks/sft_vs_trl.py [--model tiny|30m|qwen2.5-0.5b|qwen2.5-1.5b] [--tuning full|lora]
                                    [--steps 30] [--batch-size 8] [--max-len 512] [--repeats 2]

Same model, data, sequence length, effective batch, learning rate and number of steps for every contender; the
contenders alternate within each repeat, each in a fresh process. The data has realistic length variance (most
answers short, a few long). Printed: non-padding tokens per second of the training forwards, peak memory, model
FLOPs utilisation on GPU, and the ratios posttrain / TRL. Both run their defaults otherwise (posttrain groups rows by
length; TRL does not), and each is shown with and without packing.
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
CONTENDERS = ("posttrain packed", "TRL packed", "posttrain padded", "TRL padded", "posttrain packed full head")
DEFAULT = CONTENDERS[:4]


def _trl_child(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    a = spec["args"]
    tokenizer, model, rows, gpu = common.trl_inputs(spec)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    peft_config = None
    if a["tuning"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=spec["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch_size"],
        gradient_accumulation_steps=a["grad_accum"], learning_rate=a["lr"], max_length=a["max_len"],
        packing=spec["packing"], logging_steps=a["steps"], save_strategy="no", report_to="none",
        use_cpu=not gpu, bf16=gpu, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        gradient_checkpointing=a["gradient_checkpointing"], seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    meter = common.Meter(trainer.model, tokenizer.pad_token_id)
    with meter:
        trainer.train()
    return meter.result()


def _posttrain_config(spec: dict) -> dict:
    a = spec["args"]
    gpu_model = a["model"] in common.GPU_MODELS
    return {
        "model": {"name_or_path": spec["model"], "dtype": "float32"},
        "method": "sft",
        "tuning": {"mode": a["tuning"], "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": [{"path": spec["data"], "format": "messages"}], "max_seq_len": a["max_len"],
                 "packing": spec["packing"], "cache_dir": spec["out"] + "-cache"},
        "training": {"max_steps": a["steps"], "batch_size": a["batch_size"],
                     "gradient_accumulation_steps": a["grad_accum"], "learning_rate": a["lr"],
                     "logging_steps": a["steps"], "progress_bar": False, "save_total_limit": 1,
                     "mixed_precision": "bf16" if gpu_model else "no",
                     "gradient_checkpointing": a["gradient_checkpointing"],
                     "chunked_head": spec.get("chunked_head", True)},
        "output_dir": spec["out"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="30m")
    p.add_argument("--tuning", choices=("full", "lora"), default="full")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=CONTENDERS, help="run only these contenders")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        ours = spec["contender"].startswith("posttrain")
        print(json.dumps(common.posttrain_child(_posttrain_config(spec)) if ours else _trl_child(spec)))
        return

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-sft-"))
    model = common.build_model(args.model, work / "model")
    rows = common.sft_rows(args.rows, seed=0, long=args.max_len * 3 // 4)
    common.write_jsonl(rows, work / "trl.jsonl")
    common.write_jsonl([{"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["completion"]}]} for r in rows],
                       work / "posttrain.jsonl")
    words = sorted(len(r["completion"].split()) for r in rows)
    print(f"model {args.model} ({args.tuning}), {args.rows} rows: answer words median {words[len(words) // 2]}, "
          f"p90 {words[len(words) * 9 // 10]}, max {words[-1]}; max_len {args.max_len}, batch {args.batch_size} x "
          f"{args.grad_accum}, {args.steps} steps, {args.repeats} repeats")
    contenders = args.only or DEFAULT

    def spec_for(name: str, r: int) -> dict:
        ours = name.startswith("posttrain")
        return {"contender": name, "args": vars(args), "model": str(model), "packing": "packed" in name,
                "chunked_head": not name.endswith("full head"),
                "data": str(work / ("posttrain.jsonl" if ours else "trl.jsonl")),
                "out": str(work / f"run-{r}-{name.replace(' ', '-')}")}

    results = common.alternate(__file__, contenders, args.repeats, spec_for, work)
    pairs = [(a, b) for a, b in (("posttrain packed", "TRL packed"), ("posttrain padded", "TRL padded"),
                                 ("posttrain packed", "TRL padded"), ("posttrain packed", "posttrain packed full head"))
             if a in results and b in results]
    common.print_table(f"SFT {args.tuning}, model {args.model} (median of {args.repeats})",
                       common.summarise(results), pairs)


if __name__ == "__main__":
    main()
