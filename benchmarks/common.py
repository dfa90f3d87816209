"""What the side-by-side benchmarks share: local models, data with realistic length variance, and the child
process that runs one contender and measures it the same way for both.

Each contender runs in a fresh Python process (no allocator or compile state carried over), and the two
contenders alternate, so drift in the machine's load hits both alike. Throughput is measured the same way for
both: a forward pre-hook on the policy counts the non-padding input tokens of every forward that builds a graph
(reference and evaluation passes run without grad and are not counted), divided by the wall time of the training
call. Peak memory is the highest resident set size sampled every 2 ms during training (CPU), or
``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Model sizes built locally (no download). The GPU ones are the architectures of Qwen2.5-0.5B and -1.5B, kept in
# benchmarks/configs/ and randomly initialised: a throughput test needs no trained weights.
CPU_MODELS = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2),
    "30m": dict(layers=6, hidden=512, heads=8, kv_heads=4, intermediate=1408),
}
CONFIGS = Path(__file__).resolve().parent / "configs"
GPU_MODELS = {"qwen2.5-0.5b": CONFIGS / "qwen2.5-0.5b.json", "qwen2.5-1.5b": CONFIGS / "qwen2.5-1.5b.json"}


def build_model(name: str, out: Path) -> Path:
    """A model folder with our tiny tokenizer: a locally built Llama (CPU sizes) or a Qwen2.5 architecture."""
    from posttrain.models.tiny import build_tiny_model

    if name in CPU_MODELS:
        return build_tiny_model(out, vocab_size=1024, tie_embeddings=name == "tiny", max_position=4096,
                                **CPU_MODELS[name])
    if name not in GPU_MODELS:
        sys.exit(f"unknown model {name!r}; choose from {sorted(CPU_MODELS) + sorted(GPU_MODELS)}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(out / "tok", vocab_size=1024)
    tokenizer = AutoTokenizer.from_pretrained(out / "tok")
    config = AutoConfig.for_model(**json.loads(GPU_MODELS[name].read_text()))
    # The real vocabulary is 151k; ours is 1k. Keep the real size so the LM head and logits cost what they cost.
    config.pad_token_id, config.eos_token_id, config.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                                       tokenizer.eos_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


def _words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def _vocab() -> list[str]:
    from posttrain.data.synthetic.corpus import make_general_corpus

    return sorted({w.strip(".,") for doc in make_general_corpus(50, seed=0) for w in doc.split()})


def lengths(n: int, seed: int, short: int, long: int) -> list[int]:
    """Word counts with a long tail, as in chat data: most answers are short, a few are long (log-normal)."""
    rng = random.Random(seed)
    mu = math.log(short)
    return [max(3, min(long, int(rng.lognormvariate(mu, 0.9)))) for _ in range(n)]


def sft_rows(n: int, seed: int = 0, short: int = 30, long: int = 400) -> list[dict]:
    rng, vocab = random.Random(seed), _vocab()
    return [{"prompt": _words(rng, rng.randint(5, 25), vocab) + "?", "completion": _words(rng, k, vocab) + "."}
            for k in lengths(n, seed, short, long)]


def preference_rows(n: int, seed: int = 0, short: int = 30, long: int = 250) -> list[dict]:
    rng, vocab = random.Random(seed), _vocab()
    rows = []
    for k in lengths(n, seed, short, long):
        prompt = _words(rng, rng.randint(5, 25), vocab) + "?"
        rows.append({"prompt": prompt, "chosen": _words(rng, k, vocab) + ".",
                     "rejected": _words(rng, max(3, int(k * rng.uniform(0.6, 1.4))), vocab) + "."})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Meter:
    """Counts non-padding tokens of grad-building forwards and samples peak RSS while active."""

    def __init__(self, model, pad_id: int):
        import torch

        self.torch = torch
        self.pad_id, self.tokens, self.peak_rss, self.start_rss, self.elapsed = pad_id, 0, 0, 0, 0.0
        self._stop = threading.Event()
        self._thread = None
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not self.torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += int((ids != self.pad_id).sum())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        torch = self.torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start_rss = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        torch = self.torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        torch = self.torch
        gpu = torch.cuda.is_available()
        peak = torch.cuda.max_memory_allocated() if gpu else self.peak_rss
        return {"tokens": self.tokens, "seconds": self.elapsed, "tokens_per_sec": self.tokens / self.elapsed,
                "peak_bytes": peak, "growth_bytes": None if gpu else self.peak_rss - self.start_rss, "peak_kind": "cuda max_memory_allocated" if gpu else "peak RSS while training"}


def posttrain_child(config: dict) -> dict:
    """Run one posttrain stage, measuring its training loop (data and model loading are left out, as for TRL)."""
    from posttrain.config import load_config
    from posttrain.trainers import loop, stage

    measured = {}
    fit = loop.Trainer.fit

    def measured_fit(self, resume=False):
        meter = Meter(self.acc.unwrap_model(self.model), self.tokenizer.pad_token_id)
        with meter:
            out = fit(self, resume)
        measured.update(meter.result())
        return out

    loop.Trainer.fit = measured_fit
    stage.run_stage(load_config(None, raw=config), overwrite=True, log=lambda *a, **k: None)
    # Model FLOPs utilisation as the run logged it (GPU only; see posttrain/trainers/flops.py).
    logged = [json.loads(line) for line in (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    measured["mfu"] = next((m["mfu"] for m in reversed(logged) if "mfu" in m), None)
    return measured


def trl_inputs(spec: dict):
    """(tokenizer, float32 model, data rows, on GPU?) for a TRL contender, loaded as posttrain loads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    return tokenizer, model, rows, torch.cuda.is_available()


def alternate(script: str, contenders, repeats: int, spec_for, work: Path) -> dict[str, list[dict]]:
    """Each repeat runs every contender once, in order, each in a fresh process; prints each run as it ends."""
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    width = max(len(c) for c in contenders)
    for r in range(repeats):
        for name in contenders:
            res = run_child(script, spec_for(name, r), work)
            results[name].append(res)
            growth = f" (+{res['growth_bytes'] / 2**20:.0f} MiB in training)" if res.get("growth_bytes") else ""
            print(f"  repeat {r + 1} {name:<{width}} {res['tokens_per_sec']:>9.0f} tokens/s  {res['tokens']:>8} tokens "
                  f"in {res['seconds']:6.1f} s  peak {res['peak_bytes'] / 2**20:8.1f} MiB{growth}", flush=True)
    return results


def run_child(script: str, spec: dict, work: Path) -> dict:
    """Run ``script --child SPEC`` in a fresh process; its last stdout line is the JSON result."""
    path = work / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, script, "--child", str(path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{spec['contender']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict]]) -> dict:
    """Median tokens/s, peak memory and MFU of each contender over the repeats."""
    return {name: {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs),
                   "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
                   "mfu": statistics.median(r.get("mfu") or 0.0 for r in runs) or None}
            for name, runs in results.items()}


def print_table(title: str, summary: dict, pairs: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for name in summary:
        s = summary[name]
        mfu = f"  MFU {100 * s['mfu']:.1f}%" if s.get("mfu") else ""
        print(f"  {name:<28} {s['tokens_per_sec']:>10.0f} tokens/s  peak {s['peak_bytes'] / 2**20:>9.1f} MiB{mfu}")
    for ours, theirs in pairs:
        a, b = summary[ours], summary[theirs]
        print(f"  {ours} / {theirs}: speed {a['tokens_per_sec'] / b['tokens_per_sec']:.2f}x, "
              f"peak memory {a['peak_bytes'] / b['peak_bytes']:.2f}x")
