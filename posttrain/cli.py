"""Command line: parse -> config -> run. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

from posttrain import __version__
from posttrain.data.formats import FORMATS
from posttrain.errors import PosttrainError


def _tiny_model(args) -> None:
    from posttrain.models.tiny import build_tiny_model, build_tiny_moe

    if args.top_k is not None and args.moe is None:
        raise PosttrainError("tiny-model: --top-k is the routing of an MoE model; add --moe N (N experts)")
    common = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                  vocab_size=args.vocab_size, max_position=args.max_position, seed=args.seed,
                  overwrite=args.overwrite, split_digits=args.split_digits)
    if args.moe is not None:
        path = build_tiny_moe(args.out_dir, experts=args.moe, top_k=args.top_k or 2,
                              expert_intermediate=args.intermediate, **common)
    else:
        path = build_tiny_model(args.out_dir, intermediate=args.intermediate, **common)
    print(f"tiny model written to {path}")


def _train(args) -> None:
    from posttrain.config import load_config
    from posttrain.trainers.launch import launch, wants_launch
    from posttrain.trainers.stage import run_stage

    cfg = load_config(args.config, args.overrides)
    if wants_launch(cfg):  # distributed.num_processes: tokenize here once, then start the processes
        flags = ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
        launch(cfg, ["train", args.config, *args.overrides, *flags], resume=args.resume, overwrite=args.overwrite)
        return
    final = run_stage(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: final model in {final}; metrics in {cfg.output_dir}/metrics.jsonl")


def _data_prepare(args) -> None:
    from posttrain.config import load_config
    from posttrain.data.dataset import cache_folder
    from posttrain.trainers.stage import prepare_data

    cfg = load_config(args.config, args.overrides)
    fingerprint = prepare_data(cfg)
    print(f"tokenized data in {cache_folder(cfg.data, fingerprint)}")


def _data_check(args) -> None:
    from posttrain.data.report import DataReport
    from posttrain.data.validate import load_examples

    report = DataReport()
    for path in args.files:
        load_examples(path, args.format, report=report)
    print(report.format(f"data check ({args.format})"))
    report.check(args.max_drop_fraction, "data")


def _data_preview(args) -> None:
    from posttrain.config import load_config
    from posttrain.data.preview import preview

    cfg = load_config(args.config, args.overrides)
    print(preview(cfg, n=args.n, color=args.color or (args.color is None and sys.stdout.isatty())))


def _score(args) -> None:
    from posttrain.eval.reward_score import score_file

    out = args.out or str(args.data).rsplit(".", 1)[0] + ".scored.jsonl"
    summary = score_file(args.model, args.data, out, batch_size=args.batch_size)
    parts = [f"scored {summary.rows_scored} rows -> {out}"]
    if summary.mean_score is not None:
        parts.append(f"mean score {summary.mean_score:.4f}")
    if summary.pair_accuracy is not None:
        parts.append(f"pairs {summary.pairs}, chosen scored higher in {summary.pair_accuracy:.1%}")
    print("; ".join(parts))


def _run(args) -> None:
    from posttrain.pipeline import format_plan, load_pipeline, plan, run_pipeline

    pipeline = load_pipeline(args.pipeline, args.overrides)
    if args.dry_run:
        print(format_plan(plan(pipeline, force=args.force)))
        return
    run_pipeline(pipeline, force=args.force, only=args.only)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {len(pipeline.stages)} stages in {pipeline.output_dir}")


def _report(args) -> None:
    from posttrain.eval.report import write_report

    html, md = write_report(args.run_dirs, out_dir=args.out, title=args.title)
    print(f"report: {html}\nmarkdown: {md}")


def _eval(args) -> None:
    from posttrain.config import load_config
    from posttrain.eval.runner import run_eval

    cfg = load_config(args.config, args.overrides)
    path = run_eval(cfg, model_path=args.model, compare=args.compare, out_dir=args.out)
    print(f"eval results: {path}")


def _synth_tasks(args) -> None:
    from posttrain.data.synthetic.generate import write_tasks

    tasks = [x.strip() for x in args.tasks.split(",") if x.strip()] if args.tasks else None
    for path, n in write_tasks(args.out, n=args.n, seed=args.seed, tasks=tasks, fmt=args.format,
                               test_fraction=args.test_fraction, test_out=args.test_out):
        print(f"{n} rows -> {path}")


def _synth_corpus(args) -> None:
    from posttrain.data.synthetic.generate import write_corpus

    for path, n in write_corpus(args.out, n=args.n, seed=args.seed, kind=args.kind):
        print(f"{n} documents -> {path}")


def _synth_self_instruct(args) -> None:
    from posttrain.data.synthetic.self_instruct import run_self_instruct
    from posttrain.data.synthetic.settings import SelfInstructSettings, from_args

    print(run_self_instruct(args.model, args.seeds, args.out, from_args(SelfInstructSettings, args)).format())


def _synth_answers(args) -> None:
    from posttrain.data.synthetic.model_based import run_answers
    from posttrain.data.synthetic.settings import AnswerSettings, from_args

    print(run_answers(args.model, args.prompts, args.out, from_args(AnswerSettings, args)).format())


def _synth_pairs(args) -> None:
    from posttrain.data.synthetic.model_based import run_pairs
    from posttrain.data.synthetic.settings import PairSettings, from_args

    print(run_pairs(args.model, args.prompts, args.out, args.reward, from_args(PairSettings, args)).format())


def _data_dedup(args) -> None:
    from posttrain.data.overlap import deduplicate, read_rows
    from posttrain.data.synthetic import write_jsonl

    rows = read_rows(args.file)
    kept, dropped = deduplicate(rows)
    write_jsonl(kept, args.out)
    print(f"{len(kept)} of {len(rows)} rows kept -> {args.out}; {len(dropped)} duplicates dropped")
    for row, first in dropped[:5]:
        print(f"  row {row} repeats row {first}")


def _data_contamination(args) -> None:
    from posttrain.data.overlap import contamination
    from posttrain.io import atomic_write_text

    result = contamination(args.train, args.eval, n=args.n, threshold=args.threshold)
    print(result.format())
    if args.out:
        atomic_write_text(args.out, result.to_json())
        print(f"report: {args.out}")
    if args.fail_above is not None and result.rate > args.fail_above:
        raise PosttrainError(f"{result.rate:.1%} of eval rows are contaminated, above --fail-above "
                             f"{args.fail_above:.1%}")


def _demo(args) -> None:
    from posttrain.demo import run_demo

    run_demo(args.out, quick=args.quick)


def _adapter_pairs(pairs: list[str]) -> dict[str, str]:
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise PosttrainError(f"--adapter {pair!r}: expected NAME=DIR, e.g. --adapter sft=runs/sft-lora")
        if name in adapters:
            raise PosttrainError(f"--adapter {name}=...: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def _serve(args) -> None:
    from posttrain.serve.app import serve
    from posttrain.serve.engine import load_backend

    backend = load_backend(args.model, _adapter_pairs(args.adapter), backend=args.backend, dtype=args.dtype)
    serve(backend, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue)


def _chat(args) -> None:
    from posttrain.serve.chat import chat_loop
    from posttrain.serve.engine import load_backend

    # A fixed id: named after its folder, it could clash with the base's name, and chat has no way to rename it.
    adapters = {"adapter": args.adapter} if args.adapter else {}
    backend = load_backend(args.model, adapters, backend="transformers", dtype=args.dtype)
    chat_loop(backend, model=next(iter(adapters), None), system=args.system, temperature=args.temperature,
              top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)


def _export(args) -> None:
    from posttrain.export import export_model

    result = export_model(args.source, args.out, quantize=args.quantize, gguf=args.gguf, dtype=args.dtype,
                          overwrite=args.overwrite, log=lambda msg: print(f"export: {msg}", flush=True))
    print(result.summary())


def _federated(args) -> None:
    from posttrain.federated import load_federated_config, run_federated

    cfg = load_federated_config(args.config, args.overrides)
    final = run_federated(cfg, overwrite=args.overwrite)
    print(f"done: global adapter in {final}; metrics in {cfg.output_dir}/metrics.jsonl")


def _device_train(args) -> None:
    from posttrain.config import load_config
    from posttrain.ondevice.versions import train_version

    # The device folder names the run's output_dir; the config needs one to validate.
    cfg = load_config(args.config, ["output_dir=" + str(args.dir), *args.overrides])
    version = train_version(cfg, args.dir)
    print(f"done: {version.name} is the current version of {args.dir} ({version.path})")


def _device_status(args) -> None:
    from posttrain.ondevice.versions import current_version, versions

    current = current_version(args.dir)
    for v in versions(args.dir):
        mark = "*" if current is not None and v.name == current.name else " "
        info = v.info
        print(f"{mark} {v.name}  parent {info.get('parent') or '-'}  adapter {info.get('adapter_bytes', 0):,} bytes  "
              f"peak RSS {info.get('peak_rss_mb')} MiB  eval loss {info.get('eval_loss')}  {info.get('created')}")
    if current is None:
        print(f"{args.dir}: no versions yet")


def _device_rollback(args) -> None:
    from posttrain.ondevice.versions import rollback

    old, new = rollback(args.dir, args.to)
    print(f"{args.dir}: current version {old} -> {new}")


def _plan(args) -> None:
    import json

    from posttrain.plan.planner import format_plan, make_plan, plan_request

    plan = make_plan(plan_request({k: v for k, v in vars(args).items() if k not in ("func", "command", "json")}))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.")
    p.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="build a small Llama-architecture (or, with --moe, Qwen3-MoE) model and "
                       "tokenizer locally")
    t.add_argument("out_dir")
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--intermediate", type=int, default=None,
                   help="MLP width, with --moe each expert's (default: chosen from --hidden)")
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--max-position", type=int, default=1024)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    t.add_argument("--split-digits", action="store_true", help="one token per digit (arithmetic tasks)")
    t.add_argument("--moe", type=int, default=None, metavar="N", help="a mixture-of-experts model with N experts")
    t.add_argument("--top-k", type=int, default=None, help="with --moe: experts per token (default 2)")
    t.set_defaults(func=_tiny_model)

    tr = sub.add_parser(
        "train", help="run one training stage (method: pretrain, sft, reward, dpo, kto, simpo, orpo, ppo, grpo, "
             "online_dpo, rft or distill)"
    )
    tr.add_argument("config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=100")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    tr.set_defaults(func=_train)

    rn = sub.add_parser("run", help="run a multi-stage pipeline (e.g. pretrain -> SFT -> DPO); finished stages "
                                     "are skipped, an interrupted one resumes")
    rn.add_argument("pipeline", help="pipeline YAML: output_dir, defaults and named stages (docs/pipeline.md)")
    rn.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every stage")
    rn.add_argument("--dry-run", action="store_true",
                    help="print what each stage would do (skip, resume, run) and stop")
    rn.add_argument("--force", action="store_true",
                    help="run every stage again (earlier outputs go to superseded/)")
    rn.add_argument("--only", action="append", metavar="STAGE",
                    help="run only this stage (repeatable); the stages it reads must be done already")
    rn.set_defaults(func=_run)

    sc = sub.add_parser("score", help="score rows with a reward model (a final/ folder of method: reward)")
    sc.add_argument("model", help="reward model folder")
    sc.add_argument("data", help="rows: {prompt, chosen, rejected}, {prompt, completion|response} or {messages}")
    sc.add_argument("--out", help="output JSONL (default: DATA with .scored.jsonl)")
    sc.add_argument("--batch-size", type=int, default=16)
    sc.set_defaults(func=_score)

    ev = sub.add_parser("eval", help="run a config's eval suites on a model and write eval.json")
    ev.add_argument("config", help="YAML config with an eval: section")
    ev.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ev.add_argument("--model", help="the model to evaluate (default: the config's model.name_or_path)")
    ev.add_argument("--compare", help="a second model, evaluated as the 'before' (e.g. the stage's start)")
    ev.add_argument("--out", help="where eval.json and eval_samples/ go (default: the config's output_dir)")
    ev.set_defaults(func=_eval)

    dm = sub.add_parser("demo", help="every stage on a tiny local model and a verifiable task, on CPU, "
                                     "then the report (under 3 minutes on 2 CPU cores)")
    dm.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    dm.add_argument("--quick", action="store_true", help="a few steps per stage: checks the plumbing only")
    dm.set_defaults(func=_demo)

    rp = sub.add_parser("report", help="write an HTML + Markdown report over one or more run directories")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a training run")
    rp.add_argument("--out", help="folder for report.html, report.md and report_files/ "
                                  "(default: the run directory, or the runs' common parent)")
    rp.add_argument("--title", help="report title (default: from the run names)")
    rp.set_defaults(func=_report)

    sv = sub.add_parser("serve", help="serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API")
    sv.add_argument("model", metavar="MODEL_OR_RUN_DIR", help="a model folder, or a training run's output dir "
                    "(its final/; a LoRA adapter is served over its base)")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="a LoRA adapter (folder or run dir) served as model NAME; repeatable")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("POSTTRAIN_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $POSTTRAIN_API_KEY; none: open)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default: 8)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="requests allowed to wait; beyond it the server answers 429 (default: 256)")
    sv.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                    help="auto: vLLM when it is installed and a GPU is present, else transformers")
    sv.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="auto: bfloat16 on a GPU that has it, else float32")
    sv.set_defaults(func=_serve)

    ch = sub.add_parser("chat", help="chat with a model in the terminal (/reset, /system TEXT, /exit)")
    ch.add_argument("model", metavar="MODEL_OR_RUN_DIR", help="a model folder or a training run's output dir")
    ch.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (folder or run dir) to chat with")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    ch.set_defaults(func=_chat)

    ex = sub.add_parser("export", help="merge an adapter and save a standalone model (optionally int8/int4, GGUF), "
                                       "verified by reloading it and comparing logits with the source")
    ex.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a run's output_dir (its final/), a model folder "
                                                               "or a peft adapter folder")
    ex.add_argument("--out", required=True, help="folder for the exported model (written whole, or not at all)")
    ex.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                    help="weight-only quantization with torchao (int4 needs a CUDA GPU; default: none)")
    ex.add_argument("--gguf", action="store_true", help="also write model.gguf for llama.cpp (Llama architecture, "
                                                        "byte-level BPE tokenizer)")
    ex.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="dtype of the saved weights (default: the source's)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.set_defaults(func=_export)

    fd = sub.add_parser("federated", help="federated LoRA training on Flower (FedAvg / FedProx): clients train on "
                                          "their own data, only adapter weights travel")
    fd.add_argument("config", help="federated YAML config: the recipe, clients, federated and eval (docs/federated.md)")
    fd.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. federated.rounds=5")
    fd.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    fd.set_defaults(func=_federated)

    dv = sub.add_parser("device", help="on-device adaptation: LoRA versions over a quantized base, within a memory "
                                       "budget, with rollback (docs/on-device.md)")
    dvsub = dv.add_subparsers(dest="device_command", required=True)
    dvt = dvsub.add_parser("train", help="train the next adapter version on top of the current one and make it current")
    dvt.add_argument("config", help="stage YAML config (tuning.mode lora; e.g. recipes/tiny-device-lora.yaml)")
    dvt.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.train=today.jsonl")
    dvt.add_argument("--dir", required=True, help="the device folder (versions/, current.json, runs/)")
    dvt.set_defaults(func=_device_train)
    dvs = dvsub.add_parser("status", help="list the versions; * marks the current one")
    dvs.add_argument("dir", help="the device folder")
    dvs.set_defaults(func=_device_status)
    dvr = dvsub.add_parser("rollback", help="make the previous version (or --to VERSION) current again")
    dvr.add_argument("dir", help="the device folder")
    dvr.add_argument("--to", help="the version to make current (default: the current version's parent)")
    dvr.set_defaults(func=_device_rollback)

    pl = sub.add_parser("plan", help="which tuning path fits a GPU (full, LoRA, QLoRA -> SFT, DPO, ...), and every "
                                     "tuning mode's predicted peak memory; reads only the model's config")
    pl.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="a model folder or hub id (config only)")
    pl.add_argument("--gpu-memory", required=True, help="memory of one GPU: 24GiB, 80GB, 40G (G = GiB), 16384MiB")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs of that size (default 1; posttrain runs them as DDP)")
    pl.add_argument("--data", metavar="FILE", help="a data file: its token lengths choose --seq-len and are reported")
    pl.add_argument("--data-format", choices=FORMATS, help="the data file's format (default: from its keys)")
    pl.add_argument("--goal", choices=("instruction", "preference", "reasoning", "domain"), default="instruction",
                    help="what the training is for; decides the stages (default: instruction)")
    pl.add_argument("--seq-len", type=int, help="tokens per sequence (default: p99 of --data, else 2048)")
    pl.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch on each GPU (default 1)")
    pl.add_argument("--private-data", action="store_true", help="the data may not leave its owner's machines")
    pl.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default="bf16",
                    help="training.mixed_precision of the planned run (default bf16)")
    pl.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="predict for a GPU or for CPU")
    pl.add_argument("--full-logits", dest="chunked_head", action="store_false",
                    help="plan for training.chunked_head: false (the loss builds the logits of every position)")
    pl.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (custom models)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_plan)

    sy = sub.add_parser("synth", help="generate data: rule-based verifiable tasks and text corpora; tasks, "
                                      "answers and preference pairs written by a model")
    sysub = sy.add_subparsers(dest="synth_command", required=True)
    st = sysub.add_parser("tasks", help="verifiable task rows (add, reverse, upper, count, larger, largest)")
    st.add_argument("--out", required=True, help="JSONL file to write")
    st.add_argument("--n", type=int, required=True, help="rows to generate")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--tasks", help="comma-separated task names, or all (default: add,reverse,upper,count)")
    st.add_argument("--format", default="messages", choices=("messages", "alpaca", "prompt", "preference", "feedback"))
    st.add_argument("--test-fraction", type=float, default=0.0,
                    help="hold out this fraction of distinct prompts into --test-out")
    st.add_argument("--test-out", help="JSONL file for the held-out rows")
    st.set_defaults(func=_synth_tasks)
    sco = sysub.add_parser("corpus", help="raw text documents for continued pretraining (format text)")
    sco.add_argument("--out", required=True)
    sco.add_argument("--n", type=int, required=True, help="documents to generate")
    sco.add_argument("--seed", type=int, default=0)
    sco.add_argument("--kind", default="domain", choices=("domain", "general"))
    sco.set_defaults(func=_synth_corpus)
    from posttrain.data.synthetic import settings as synth  # the model-based generators' options are its fields

    model_help = "the generating model: a folder, a hub id or a training run's output dir (its final/)"
    ssi = sysub.add_parser("self-instruct", help="new tasks written by a model from seed tasks (Self-Instruct), "
                                                 "filtered for repeats and similarity (docs/synth.md)")
    ssi.add_argument("--model", required=True, help=model_help)
    ssi.add_argument("--seeds", required=True, help="seed tasks: rows of format alpaca, multitask, messages or prompt")
    ssi.add_argument("--out", required=True, help="JSONL file to write")
    synth.add_arguments(ssi, synth.SelfInstructSettings)
    ssi.set_defaults(func=_synth_self_instruct)
    san = sysub.add_parser("answers", help="a model's answers to prompts, as messages or alpaca rows")
    san.add_argument("--model", required=True, help=model_help)
    san.add_argument("--prompts", required=True, help="rows of format prompt, messages, alpaca or multitask")
    san.add_argument("--out", required=True, help="JSONL file to write")
    synth.add_arguments(san, synth.AnswerSettings)
    san.set_defaults(func=_synth_answers)
    spa = sysub.add_parser("pairs", help="preference pairs: the best and worst of several sampled responses, "
                                         "ranked by a reward, a reward model or an LLM judge")
    spa.add_argument("--model", required=True, help=model_help)
    spa.add_argument("--prompts", required=True, help="rows of format prompt, messages, alpaca or multitask (a "
                                                      "conversation's last answer is the reference)")
    spa.add_argument("--out", required=True, help="JSONL file to write")
    spa.add_argument("--reward", action="append", required=True, metavar="SPEC",
                     help="a reward type (exact_match, numeric_match, ...), a reward model folder, a YAML/JSON spec "
                          "such as '{type: judge, base_url: ..., model: ..., rubric: ...}' or "
                          "'{type: pairwise_judge, ...}', or a .yaml file of specs; repeatable (weighted sum)")
    synth.add_arguments(spa, synth.PairSettings)
    spa.set_defaults(func=_synth_pairs)

    d = sub.add_parser("data", help="inspect training data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate data files and print a row-level report")
    dc.add_argument("files", nargs="+")
    dc.add_argument("--format", required=True, choices=FORMATS)
    dc.add_argument("--max-drop-fraction", type=float, default=1.0,
                    help="exit non-zero when more than this fraction of rows is bad (default: only when none is usable)")
    dc.set_defaults(func=_data_check)
    dd = dsub.add_parser("dedup", help="drop rows whose normalised text repeats an earlier row's")
    dd.add_argument("file")
    dd.add_argument("--out", required=True, help="JSONL file for the kept rows")
    dd.set_defaults(func=_data_dedup)
    dco = dsub.add_parser("contamination", help="eval rows whose word n-grams occur in the training data")
    dco.add_argument("--train", nargs="+", required=True, help="training JSONL files")
    dco.add_argument("--eval", nargs="+", required=True, help="eval JSONL files")
    dco.add_argument("--n", type=int, default=8, help="n-gram length in words (default: 8)")
    dco.add_argument("--threshold", type=float, default=0.5,
                     help="flag an eval row when this share of its n-grams is in the training data (default 0.5)")
    dco.add_argument("--out", help="write the full report (every flagged row) as JSON")
    dco.add_argument("--fail-above", type=float, help="exit 2 when more than this share of eval rows is flagged")
    dco.set_defaults(func=_data_contamination)
    dpr = dsub.add_parser("prepare", help="tokenize a config's data into the cache once, before launching the "
                                           "training processes yourself (accelerate launch, torchrun)")
    dpr.add_argument("config")
    dpr.add_argument("overrides", nargs="*")
    dpr.set_defaults(func=_data_prepare)
    dp = dsub.add_parser("preview", help="show the first rendered samples with trained tokens marked")
    dp.add_argument("config")
    dp.add_argument("overrides", nargs="*")
    dp.add_argument("-n", type=int, default=3, help="samples to show")
    dp.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                    help="colour trained tokens (default: when printing to a terminal); otherwise [[brackets]]")
    dp.set_defaults(func=_data_preview)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = 0
    try:
        args.func(args)
    except PosttrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        distributed = _close_process_group()
    if distributed:
        # The interpreter's own teardown can destroy gloo's C++ worker threads while they are still joinable,
        # and the process then dies with SIGABRT ("terminate called without an active exception") after a
        # good run, which fails the whole launch. Everything is written and closed by now: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _close_process_group() -> bool:
    """Tear down the process group, if one is open; True when there was one."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True
