"""Run one stage: config -> data -> model -> tuning -> loop -> output directory."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

from posttrain import __version__
from posttrain.config import ONLINE_METHODS, VLLM_MODES, RunConfig, dump_config
from posttrain.errors import ConfigError, PosttrainError
from posttrain.io import atomic_dir, atomic_write_text
from posttrain.models.checkpoint import is_peft, save_model
from posttrain.trainers.supervised import SupervisedMethod

SUPERVISED = ("pretrain", "sft")


def _versions() -> dict:
    import accelerate
    import torch
    import transformers

    out = {"posttrain": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise PosttrainError(
                f"output_dir {out} already holds a run. Continue it with --resume, "
                f"choose another output_dir, or pass --overwrite to replace it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_run_json(out: Path, info: dict) -> None:
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=str))


def run_stage(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, log=print) -> Path:
    """Train one stage and return the path of its final model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from posttrain.data.pairs import check_feedback_balance
    from posttrain.models.heads import load_reward_model
    from posttrain.data.templates import ChatEncoder
    from posttrain.models.load import load_model
    from posttrain.trainers.distill import check_shared_tokenizer, teacher_dataset
    from posttrain.trainers.distill import make_trainer as make_distill_trainer
    from posttrain.trainers.loop import Trainer
    from posttrain.tuning import apply_tuning, count_parameters

    import torch

    if cfg.tuning.mode == "qlora":  # before any data work: refused on a machine that cannot run it
        from posttrain.tuning.qlora import require_qlora_support

        require_qlora_support()
    from posttrain.trainers.moe import check_moe_config, setup_moe

    check_moe_config(cfg)  # moe options on a model that cannot take them: refused before any data work
    kept = cfg.starts_from_kept_adapter()
    if kept:  # refused before any data work, not after
        from posttrain.tuning.kept import check_continuation

        check_continuation(cfg.tuning.mode, kept)
    if kept and cfg.preference.reference == "adapters_off":
        # Checked again here: in a pipeline the folder may not have existed when the config was validated.
        raise ConfigError(
            f"preference.reference=adapters_off: model.name_or_path={cfg.model.name_or_path!r} is a {kept} adapter, "
            f"kept unmerged when loaded; with it off the reference would be its bare base. Use precomputed or live"
        )
    from posttrain.trainers.parallel import make_strategy, resolve_strategy

    engine, zero_stage = resolve_strategy(cfg)
    # accelerate forms a gloo process group for CPU launches (torchrun, accelerate launch) only when told cpu=True.
    # DeepSpeed casts the model itself (its bf16 section); accelerate's autocast still serves the reference and
    # teacher forwards outside the engine.
    if engine == "fsdp" and cfg.distributed.fsdp.cpu_offload and torch.cuda.is_available():
        from posttrain.trainers.parallel import open_offload_group

        open_offload_group()
    acc = Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=not torch.cuda.is_available())
    say = log if acc.is_main_process else (lambda *a, **k: None)
    strategy = make_strategy(cfg, acc, engine, zero_stage)
    say(f"parallelism: {strategy.describe()}")
    if engine == "deepspeed" and zero_stage == 3 and cfg.training.chunked_head:
        # ZeRO-3 has released a frozen LM head's weight by the time the chunked head recomputes in the backward.
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"chunked_head": False})})
        say("training.chunked_head is off under ZeRO-3: the LM head runs once on the whole batch")
    tokenizer = stage_tokenizer(cfg)
    if cfg.method == "distill":  # refused before --overwrite deletes the previous run, and before any data work
        check_shared_tokenizer(cfg, tokenizer, say)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        _prepare_output_dir(out, resume, overwrite)
    acc.wait_for_everyone()
    set_seed(cfg.training.seed)

    # Tokenized once: by `posttrain train` before it starts the processes (distributed.num_processes), by
    # `posttrain data prepare`, or else by the main process while the others wait, then read from the cache.
    with acc.main_process_first():
        train_set, eval_set, report, fingerprint = stage_datasets(cfg, tokenizer, say)
    say(report.format())
    if cfg.method == "distill" and cfg.distill.mode == "sequence":
        # The student trains on the teacher's answers to these prompts: those become the stage's data.
        train_set, eval_set, report, fingerprint = teacher_dataset(cfg, acc, tokenizer, train_set, eval_set,
                                                                   fingerprint, out, resume, say)
        say(report.format())
    say(f"training rows: {len(train_set)} ({train_set.n_tokens} tokens)"
        + (f", eval rows: {len(eval_set)}" if eval_set is not None else ""))

    if cfg.method == "kto":
        check_feedback_balance(train_set)
    if cfg.method == "reward":
        model = load_reward_model(_model_config(cfg), cfg.tuning.mode, tokenizer.pad_token_id)
    else:
        model = load_model(_model_config(cfg), cfg.tuning.mode, qlora=cfg.tuning.qlora)
    eval_before = _evaluate_start(cfg, acc, model, tokenizer, out, resume, say)
    if cfg.method in ONLINE_METHODS:
        method = None
    else:
        sets = {"train": train_set, "eval": eval_set}
        method = _method(cfg, acc, model, tokenizer, sets, fingerprint, say)
        train_set, eval_set = sets["train"], sets["eval"]  # distillation's top-k cache rides on the rows
    model = apply_tuning(model, cfg.tuning, "SEQ_CLS" if cfg.method == "reward" else "CAUSAL_LM")
    method = setup_moe(cfg, model, method, tokenizer.pad_token_id, say)
    option = "distill.disable_dropout" if cfg.method == "distill" else "preference.disable_dropout"
    if cfg.method == "distill":  # sequence-level distillation trains exactly as SFT does
        dropout_off = cfg.distill.disable_dropout and cfg.distill.mode != "sequence"
    else:
        dropout_off = cfg.method not in SUPERVISED and cfg.preference.disable_dropout
    if dropout_off:
        from posttrain.models.load import disable_dropout

        if disable_dropout(model):
            say(f"dropout turned off in the policy ({option})")
    trainable, total = count_parameters(model)
    say(f"tuning mode {cfg.tuning.mode}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")

    info = {
        "status": "running", "method": cfg.method, "seed": cfg.training.seed, "versions": _versions(),
        "data_fingerprint": fingerprint, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv, "trainable_params": trainable, "total_params": total,
        "devices": acc.num_processes, "device_type": acc.device.type, "reference": cfg.reference_mode(),
    }
    if acc.is_main_process:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        atomic_write_text(out / "data_report.json", report.to_json())
        _write_run_json(out, info)

    if cfg.method in ONLINE_METHODS:
        trainer = _online_trainer(cfg, acc, model, tokenizer, train_set, eval_set, say)
    elif cfg.method == "distill":
        trainer = make_distill_trainer(cfg, acc, model, tokenizer, method, train_set, eval_set, say, strategy)
    else:
        trainer = Trainer(cfg, acc, model, tokenizer, method, train_set, eval_set, log=say, strategy=strategy)
    if cfg.eval is not None and cfg.eval.every_steps:
        from posttrain.eval.runner import step_hook

        trainer.step_hooks.append(step_hook(cfg.eval, acc, lambda: trainer.model, tokenizer, cfg.data.max_seq_len))
    from posttrain.ondevice.memory import MemoryBudget, memory_report

    if cfg.memory.budget_mb is not None:
        trainer.step_hooks.append(MemoryBudget(cfg.memory, say))
    try:
        result = trainer.fit(resume=resume)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        info.update(status=status, error=str(exc) or type(exc).__name__, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    resume_with="posttrain train <config> --resume", **memory_report(cfg.memory))
        if acc.is_main_process:
            _write_run_json(out, info)
        raise
    if cfg.training.early_stopping_patience is not None and trainer.load_best():
        say(f"final model = best checkpoint (step {trainer.state.best_step}, eval loss {trainer.state.best_eval:.4f})")
    final = out / "final"
    # The whole model on the main process: gathered from the shards under FSDP / ZeRO-3 (a collective).
    unwrapped = trainer.strategy.full_model(trainer.model)
    if acc.is_main_process:
        if cfg.method == "reward" and is_peft(unwrapped):
            # A standalone reward model loads with AutoModelForSequenceClassification; an adapter would not.
            unwrapped = unwrapped.merge_and_unload()
        elif cfg.method != "pretrain":
            _set_end_of_turn(unwrapped, tokenizer, ChatEncoder(tokenizer).end_of_turn_id)
        with atomic_dir(final) as tmp:
            save_model(unwrapped, tokenizer, tmp)
            if is_peft(unwrapped):
                unwrapped.get_base_model().generation_config.save_pretrained(str(tmp))
        info.update(result, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), tokens=trainer.state.tokens,
                    best_eval_loss=trainer.state.best_eval, best_step=trainer.state.best_step,
                    skipped_steps=trainer.state.skipped_steps, final=str(final), **memory_report(cfg.memory))
        _write_run_json(out, info)
        if cfg.eval is not None:
            if trainer.strategy.shards_params:  # gathered on the CPU; the other processes wait meanwhile
                unwrapped.to(acc.device)
            _evaluate_final(cfg, unwrapped, tokenizer, out, eval_before, trainer.state.step, say)
    acc.wait_for_everyone()
    return final


def stage_datasets(cfg: RunConfig, tokenizer, say=print):
    """(train, eval or None, report, fingerprint) of a stage: tokenized, or read from the data cache."""
    from posttrain.data.dataset import build_datasets
    from posttrain.trainers.distill import prompt_room

    room = cfg.online.generation.max_new_tokens if cfg.method in ONLINE_METHODS else prompt_room(cfg)
    return build_datasets(cfg.data, tokenizer, cfg.method, cfg.training.seed, log=say, max_new_tokens=room)


def stage_tokenizer(cfg: RunConfig):
    """The stage's tokenizer, with its chat template resolved for every method but pretraining."""
    from posttrain.data.templates import resolve_chat_template
    from posttrain.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.method != "pretrain":
        resolve_chat_template(tokenizer, cfg.model.chat_template)
    return tokenizer


def prepare_data(cfg: RunConfig, log=print) -> str:
    """Tokenize a stage's data into the cache (what every process of a launch then reads); its fingerprint."""
    _, _, report, fingerprint = stage_datasets(cfg, stage_tokenizer(cfg), log)
    log(report.format())
    return fingerprint


def _model_config(cfg: RunConfig):
    """``cfg.model``, in float32 when LoRA also trains full copies of the embeddings (``dtype: auto``).

    A LoRA base may load in bf16 on GPU since only the fp32 adapters train; peft's ``modules_to_save`` copies
    take the base's dtype, and full weights that the optimizer updates need fp32 master weights.
    """
    if cfg.tuning.mode == "lora" and cfg.tuning.lora.train_embeddings and cfg.model.dtype == "auto":
        return cfg.model.model_copy(update={"dtype": "float32"})
    return cfg.model


def _evaluate_start(cfg: RunConfig, acc, model, tokenizer, out: Path, resume: bool, say) -> dict | None:
    """The eval suites on the starting model (kept in eval_before.json, so a resumed run does not redo them)."""
    if cfg.eval is None or not cfg.eval.before or not acc.is_main_process:
        return None
    from posttrain.eval.runner import evaluate
    from posttrain.eval.suites import SuiteResult

    saved = out / "eval_before.json"
    if resume and saved.is_file():
        return {k: SuiteResult(**v) for k, v in json.loads(saved.read_text()).items()}
    say("evaluating the starting model (eval.before)")
    before = evaluate(model, tokenizer, cfg.eval, max_seq_len=cfg.data.max_seq_len,
                      samples_dir=out / "eval_samples" / "before", log=say)
    atomic_write_text(saved, json.dumps({k: vars(r) for k, r in before.items()}, default=str))
    return before


def _evaluate_final(cfg: RunConfig, model, tokenizer, out: Path, before: dict | None, step: int, say) -> None:
    from posttrain.eval.runner import eval_record, evaluate, write_eval_json

    say("evaluating the final model")
    after = evaluate(model, tokenizer, cfg.eval, max_seq_len=cfg.data.max_seq_len,
                     samples_dir=out / "eval_samples" / "after", log=say)
    record = eval_record(cfg.eval, before, after, model=str(out / "final"), start_model=cfg.model.name_or_path,
                         method=cfg.method, run_dir=str(out), step=step)
    write_eval_json(out, record, log=say)


def _method(cfg: RunConfig, acc, model, tokenizer, sets: dict, data_fingerprint: str, say):
    """The method plug-in for the loop, holding DPO's and KTO's reference when it is scored live.

    A precomputed reference is scored here, with the starting model, before any tuning transform.
    """
    from posttrain.data.dataset import cache_folder
    from posttrain.trainers.preference import make_method
    from posttrain.trainers.reference import attach_precomputed

    # Sequence-level distillation is plain SFT on the teacher's answers.
    if cfg.method in SUPERVISED or (cfg.method == "distill" and cfg.distill.mode == "sequence"):
        return SupervisedMethod(tokenizer.pad_token_id, sets["train"].task_names, chunked=cfg.training.chunked_head)
    if cfg.method == "distill":
        from posttrain.trainers.distill import make_method as make_distill_method

        return make_distill_method(cfg, acc, model, tokenizer, sets, cache_folder(cfg.data, data_fingerprint), say)
    method = make_method(cfg, tokenizer.pad_token_id, _reference(cfg, acc))
    if cfg.reference_mode() == "precomputed":
        settings = f"{cfg.training.mixed_precision}|{cfg.model.attn_implementation}|{acc.device.type}"
        attach_precomputed(
            sets, method, model, cache_folder(cfg.data, data_fingerprint), settings=settings,
            batch_size=cfg.preference.reference_batch_size or 2 * cfg.training.batch_size,
            device=acc.device, autocast=acc.autocast,
            progress=cfg.training.progress_bar and acc.is_main_process, log=say,
            rank=acc.process_index, world=acc.num_processes,
        )
    return method


def _reference(cfg: RunConfig, acc):
    """The reference scored during training (a live frozen copy, or the policy with adapters off), or None."""
    from posttrain.trainers.reference import Reference

    mode = cfg.reference_mode()
    if mode == "live":
        from posttrain.models.load import load_model

        ref = load_model(_model_config(cfg), cfg.tuning.mode, qlora=cfg.tuning.qlora)
        if cfg.tuning.mode != "qlora":  # a quantised model is placed on its GPU when loaded
            ref = ref.to(acc.device)
        return Reference("live", ref.eval().requires_grad_(False), chunked=cfg.training.chunked_head)
    return Reference("adapters_off", chunked=cfg.training.chunked_head) if mode == "adapters_off" else None


def _online_trainer(cfg: RunConfig, acc, model, tokenizer, prompts, eval_prompts, say):
    """The rollout -> reward -> update trainer, with its generation engine, rewards and reference."""
    from posttrain.generation import make_engine, resolve_engine, stop_token_ids
    from posttrain.rl.rewards import build_rewards, pairwise_judge
    from posttrain.trainers.online import OnlineTrainer, PpoTrainer, RftTrainer

    stop_ids = stop_token_ids(tokenizer)
    gen = cfg.online.generation
    kind = resolve_engine(gen.engine, vllm_can_load=cfg.tuning.mode in VLLM_MODES)
    engine = make_engine(kind, model, tokenizer, stop_token_ids=stop_ids, model_path=cfg.model.name_or_path,
                         batch_size=gen.batch_size)
    rewards = build_rewards(cfg.online.rewards) if cfg.online.rewards else None
    judge = None
    if cfg.method == "online_dpo" and cfg.online.online_dpo.judge:
        judge = pairwise_judge(cfg.online.online_dpo.judge, "online.online_dpo.judge")
    reference = _reference(cfg, acc)
    kw = {}
    if cfg.method == "ppo":
        from posttrain.models.heads import load_value_model

        kw["critic"] = load_value_model(cfg, tokenizer.pad_token_id)
    cls = {"rft": RftTrainer, "ppo": PpoTrainer}.get(cfg.method, OnlineTrainer)
    return cls(cfg, acc, model, tokenizer, prompts, eval_prompts, rewards=rewards, engine=engine,
               reference=reference, stop_ids=stop_ids, judge=judge, log=say, **kw)


def _set_end_of_turn(model, tokenizer, eot_id: int | None) -> None:
    """Make generation stop at the chat template's end-of-turn token (servers read generation_config)."""
    base = model.get_base_model() if is_peft(model) else model
    gen = getattr(base, "generation_config", None)
    if gen is None or eot_id is None:
        return
    eos = gen.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    gen.eos_token_id = [eot_id] + [e for e in eos if e != eot_id]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
