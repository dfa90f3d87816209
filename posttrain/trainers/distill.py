"""Knowledge distillation (``method: distill``): a frozen teacher guides the student, in three modes.

- ``logit`` (Hinton et al. 2015): on the data's own responses, the loss at each trained token is
  ``hard_weight · NLL + (1 − hard_weight) · T² · D(teacher || student)``. The teacher scores every batch
  (``teacher_cache: live``) or its top-k log-probs are computed once and cached beside the tokenized
  data (``topk``), keyed by a hash of its weights, like precomputed reference log-probs.
- ``sequence`` (Kim & Rush 2016): the teacher answers the data's prompts once; its answers are written
  to ``<output_dir>/distill/`` as a messages dataset with provenance, and the student is SFT-trained on it.
- ``on_policy`` (GKD, Agarwal et al. 2024): the student samples responses to the step's prompts and the
  divergence is taken on its own tokens; a fraction ``1 − student_fraction`` of steps uses the data's
  responses instead. ``OnPolicyDistillTrainer`` swaps the responses in ``_micro_batches``, adds its rollout
  metrics in ``_apply_update`` and, on prompt data, evaluates the student's greedy answers (``evaluate``):
  counting, accumulation, updates and checkpoints are the loop's.

Teacher and student must share the tokenizer's ids (checked before the output folder or any data is touched).
Both models' LM heads run on the trained positions only where ``training.chunked_head`` allows
(``models/logprobs.py: labelled_logits``). The divergences and their mix are pure functions in
``losses/distill.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.config import VLLM_MODES, DataSource, ModelConfig, RunConfig
from posttrain.data.collate import collate, n_targets, split_global_batch
from posttrain.data.templates import IGNORE_INDEX
from posttrain.errors import ConfigError, PosttrainError
from posttrain.io import atomic_write_bytes, atomic_write_text
from posttrain.losses.distill import (
    distill_token_losses,
    distill_token_losses_topk,
    mixed_token_losses,
    teacher_topk,
)
from posttrain.models.logprobs import labelled_logits
from posttrain.trainers.loop import Trainer, gather_lists
from posttrain.trainers.reference import forward_inputs, unwrap, weights_fingerprint

# Bump when the way the top-k cache is computed changes, so stale caches are never reused.
# 2: log-probs at the loss's temperature over the full vocabulary, with the teacher's leftover probability.
TOPK_CACHE_VERSION = "2"


# ---- the teacher ---------------------------------------------------------------------------------------


def teacher_config(cfg: RunConfig) -> ModelConfig:
    """How the teacher is loaded: its name and dtype, with the student's attention kernel and remote-code setting.

    Everything else about the student's loading (its chat template, any quantisation) stays the student's own.
    """
    dtype = cfg.distill.teacher_dtype
    if dtype == "auto":
        # Frozen weights need no fp32 master copy; bf16 halves the teacher's memory where it is fast.
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return ModelConfig(name_or_path=cfg.distill.teacher, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)


@contextlib.contextmanager
def _naming_the_teacher(cfg: RunConfig):
    """Loading errors name ``distill.teacher``, not ``model.name_or_path`` (which is the student)."""
    try:
        yield
    except PosttrainError as exc:
        message = str(exc).replace("model.name_or_path=", "")
        raise PosttrainError(f"distill.teacher={cfg.distill.teacher!r}: {message}") from None


def load_teacher(cfg: RunConfig, device):
    from posttrain.models.load import load_model

    with _naming_the_teacher(cfg):
        teacher = load_model(teacher_config(cfg), "full")
    return teacher.to(device).eval().requires_grad_(False)


def tokenizer_difference(student, teacher) -> str | None:
    """Why two tokenizers do not map tokens to the same ids, or None when they do."""
    vs, vt = student.get_vocab(), teacher.get_vocab()
    if len(vs) != len(vt):
        return f"their vocabularies have {len(vs)} (student) and {len(vt)} (teacher) tokens"
    moved = sorted(t for t, i in vs.items() if vt.get(t) != i)
    if moved:
        t = moved[0]
        return (f"{len(moved)} tokens have other ids, e.g. {t!r} is id {vs[t]} for the student and "
                f"{vt.get(t)} for the teacher")
    return None


def special_token_difference(student, teacher) -> str | None:
    """How two tokenizers with the same ids differ in which tokens they call special, or None.

    An instruct teacher and a base student of one family often differ only here: both models still read and
    score the same ids, so this is worth a warning, not a refusal.
    """
    ss, st = sorted(student.all_special_tokens), sorted(teacher.all_special_tokens)
    if ss != st:
        return f"their special tokens differ (student {ss}, teacher {st})"
    if student.eos_token != teacher.eos_token:
        return f"their end-of-sequence tokens differ ({student.eos_token!r} and {teacher.eos_token!r})"
    return None


def check_shared_tokenizer(cfg: RunConfig, tokenizer, log=print) -> None:
    """Refuse a teacher whose token ids differ from the student's, naming both models; warn on special tokens."""
    from posttrain.models.load import load_tokenizer

    with _naming_the_teacher(cfg):
        theirs = load_tokenizer(teacher_config(cfg))
    problem = tokenizer_difference(tokenizer, theirs)
    if problem:
        raise ConfigError(
            f"distill.teacher={cfg.distill.teacher!r} and model.name_or_path={cfg.model.name_or_path!r} do not "
            f"share a tokenizer: {problem}. Distillation compares the two models' next-token distributions id by "
            f"id, and the teacher reads the student's token ids; choose a teacher with the student's tokenizer"
        )
    warning = special_token_difference(tokenizer, theirs)
    if warning:
        log(f"warning: distill.teacher={cfg.distill.teacher!r} and the student share their token ids, but {warning}. "
            f"Both read the student's chat template, and generation stops at the student's end-of-turn and "
            f"end-of-sequence tokens")


def prompt_room(cfg: RunConfig) -> int:
    """Tokens a prompt row must leave free in data.max_seq_len for a generated response (0: no generation)."""
    from posttrain.data.dataset import reads_prompts

    if cfg.method == "distill" and reads_prompts(cfg.data, "distill"):
        return cfg.distill.generation.max_new_tokens
    return 0


# ---- logit distillation -------------------------------------------------------------------------------------


@dataclass
class CachedRow:
    """A training row's samples with the teacher's cached top-k at each sample's trained tokens.

    ``topk[i]``: sample i's ((n, k) log-probs, (n, k) ids, (n,) log leftover) at its n trained tokens.
    """

    samples: list[tuple]
    topk: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class DistillMethod:
    """The loop's plug-in: token rows, trained tokens as units, the mixed hard/soft loss summed over them.

    Metrics (per trained token): ``nll`` (at T = 1, of the batch's response tokens: the data's, or on an
    on-policy step the student's own samples) and ``distill`` (T² · divergence).
    """

    perplexity = False  # eval_loss mixes the NLL with the divergence; eval_nll is logged on its own

    def __init__(self, pad_id: int, cfg: RunConfig, teacher=None, vocab: int | None = None):
        d = cfg.distill
        self.pad_id = pad_id
        self.teacher = teacher
        self.vocab = vocab  # ids both models have; with a cached teacher only the cache knows the teacher's
        self.kind, self.beta, self.temperature = d.loss, d.jsd_beta, d.temperature
        self.hard_weight, self.topk = d.hard_weight, d.topk
        self.chunked = cfg.training.chunked_head

    def collate(self, rows) -> dict[str, torch.Tensor]:
        if not rows or not isinstance(rows[0], CachedRow):
            return collate(rows, self.pad_id)
        batch = collate([row.samples for row in rows], self.pad_id)
        width = batch["input_ids"].shape[1]
        k = next((lp.shape[1] for row in rows for lp, _, _ in row.topk), self.topk)  # k is cut to a smaller vocab
        logps = torch.zeros(len(rows), width - 1, k)
        ids = torch.zeros(len(rows), width - 1, k, dtype=torch.long)
        rest = torch.zeros(len(rows), width - 1)
        for r, row in enumerate(rows):
            at = 0
            for sample, (lp, top, left) in zip(row.samples, row.topk):
                labels = sample[1]
                # Position t's logits predict token t + 1; a sample's first token is never a target.
                pos = [at + j - 1 for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX]
                if len(pos) != len(lp):
                    raise PosttrainError("the teacher's top-k cache does not fit the tokenized data; delete the "
                                         "teacher-top*.npz files in the data cache folder and run again")
                logps[r, pos] = torch.from_numpy(lp)
                ids[r, pos] = torch.from_numpy(top.astype(np.int64))
                rest[r, pos] = torch.from_numpy(left)
                at += len(sample[0])
        batch["teacher_logps"], batch["teacher_ids"], batch["teacher_rest"] = logps, ids, rest
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return n_targets(batch["labels"])

    def loss(self, model, batch: dict[str, torch.Tensor]):
        inputs = forward_inputs(batch)
        scored = batch["labels"][:, 1:] != IGNORE_INDEX
        student = labelled_logits(model, inputs, batch["labels"], chunked=self.chunked)  # (N, V)
        targets = batch["labels"][:, 1:][scored]
        nll = F.cross_entropy(student.float(), targets, reduction="none")
        div = self._divergence(student, batch, inputs, scored)
        per_token = mixed_token_losses(nll, div, self.hard_weight)
        return per_token.sum(), {"nll": nll.detach().sum(), "distill": div.detach().sum()}

    def _divergence(self, student: torch.Tensor, batch: dict, inputs: dict, scored: torch.Tensor) -> torch.Tensor:
        """T² · D(teacher || student) at each trained position, (N,)."""
        kw = {"kind": self.kind, "temperature": self.temperature, "beta": self.beta}
        ones = torch.ones(1, student.shape[0], device=student.device)
        if "teacher_logps" in batch:
            lp, ids, rest = (batch[f"teacher_{x}"][scored][None] for x in ("logps", "ids", "rest"))
            return distill_token_losses_topk(student[:, : self.vocab][None], lp, ids, rest, ones, **kw)[0]
        with torch.no_grad():
            teacher = labelled_logits(self.teacher, inputs, batch["labels"], chunked=self.chunked)
        # Embedding matrices are often padded past the tokenizer: compare on the ids both models have.
        vocab = min(student.shape[-1], teacher.shape[-1])
        student, teacher = student[:, :vocab], teacher[:, :vocab]
        if self.topk is not None:
            lp, ids, rest = teacher_topk(teacher, self.topk, self.temperature)
            return distill_token_losses_topk(student[None], lp[None], ids[None], rest[None], ones, **kw)[0]
        return distill_token_losses(student[None], teacher[None], ones, **kw)[0]


class TeacherTopkSet:
    """A tokenized set whose rows carry the teacher's cached top-k (``CachedRow``)."""

    def __init__(self, base, logps: np.ndarray, ids: np.ndarray, rest: np.ndarray, offsets: np.ndarray):
        self.base, self.logps, self.ids, self.rest, self.offsets = base, logps, ids, rest, offsets

    def __len__(self) -> int:
        return len(self.base)

    def row_lengths(self) -> list[int]:
        return self.base.row_lengths()

    def row(self, r: int) -> CachedRow:
        spans = [(self.offsets[i], self.offsets[i + 1]) for i in self.base.rows[r]]
        return CachedRow(self.base.row(r), [(self.logps[a:b], self.ids[a:b], self.rest[a:b]) for a, b in spans])


@torch.no_grad()
def _topk_arrays(teacher, ds, cfg: RunConfig, vocab: int, batch_size: int, pad_id: int, device, autocast,
                 samples: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{sample: ((n, k) log-probs, (n, k) ids, (n,) log leftover)} of the teacher at the sample's n trained tokens."""
    d = cfg.distill
    order = sorted(samples, key=lambda i: -len(ds.input_ids[i]))
    out = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([[(ds.input_ids[i].tolist(), ds.labels[i].tolist())] for i in idx], pad_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        with autocast():
            logits = labelled_logits(teacher, forward_inputs(batch), batch["labels"],
                                     chunked=cfg.training.chunked_head)[:, :vocab]
        lp, top, rest = teacher_topk(logits, d.topk, d.temperature)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        for i, a, b, c in zip(idx, lp.split(counts), top.split(counts), rest.split(counts)):
            out[i] = (a.cpu().numpy().astype(np.float32), b.cpu().numpy().astype(np.int32),
                      c.cpu().numpy().astype(np.float32))
    return out


def attach_topk_cache(sets: dict, cfg: RunConfig, student, cache: Path, *, device, autocast, pad_id: int, log,
                      rank: int = 0, world: int = 1) -> int:
    """Replace each token set in ``sets`` by a ``TeacherTopkSet``, from the cache or computed once by the teacher.

    Returns the vocabulary both models have. The key covers the teacher's weights (hashed as loaded), k, the
    temperature (the leftover probability outside the top k cannot be re-tempered), the settings that change
    the numbers and the library versions; ``cache`` is the tokenized data's own folder, so the data fingerprint
    is in it too. With several processes each scores every ``world``-th sample and the parts are gathered.
    """
    import transformers

    d = cfg.distill
    teacher = load_teacher(cfg, device)
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    parts = [weights_fingerprint(teacher), str(d.topk), repr(d.temperature), str(vocab), cfg.training.mixed_precision,
             str(cfg.model.attn_implementation), device.type, teacher.config.to_json_string(), torch.__version__,
             transformers.__version__, TOPK_CACHE_VERSION]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
    path = cache / f"teacher-top{d.topk}-{key}.npz"
    names = [name for name, ds in sets.items() if ds is not None]
    if path.is_file():
        z = np.load(path)
        if all(f"{n}_offsets" in z and len(z[f"{n}_offsets"]) == len(sets[n].input_ids) + 1 for n in names):
            for n in names:
                sets[n] = TeacherTopkSet(sets[n], z[f"{n}_logps"], z[f"{n}_ids"], z[f"{n}_rest"], z[f"{n}_offsets"])
            log(f"teacher top-{d.topk} log-probs loaded from cache {path}")
            return vocab
    batch_size = d.teacher_batch_size or 2 * cfg.training.batch_size
    k = min(d.topk, vocab)
    arrays = {}
    for n in names:
        ds = sets[n]
        mine = _topk_arrays(teacher, ds, cfg, vocab, batch_size, pad_id, device, autocast,
                            list(range(rank, len(ds.input_ids), world)))
        mine = dict(gather_lists(list(mine.items()), world))
        every = [mine[i] for i in range(len(ds.input_ids))]
        offsets = np.concatenate([[0], np.cumsum([len(x[0]) for x in every])]).astype(np.int64)
        logps = np.concatenate([x[0] for x in every]) if every else np.zeros((0, k), np.float32)
        ids = np.concatenate([x[1] for x in every]) if every else np.zeros((0, k), np.int32)
        rest = np.concatenate([x[2] for x in every]) if every else np.zeros(0, np.float32)
        arrays.update({f"{n}_logps": logps, f"{n}_ids": ids, f"{n}_rest": rest, f"{n}_offsets": offsets})
        sets[n] = TeacherTopkSet(ds, logps, ids, rest, offsets)
    del teacher
    if rank == 0:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        log(f"teacher top-{d.topk} log-probs computed once and cached in {path}")
    return vocab


# ---- sequence-level distillation -----------------------------------------------------------------------------


def _engine(cfg: RunConfig, kind: str, model, tokenizer, model_path: str):
    from posttrain.generation import make_engine, stop_token_ids

    return make_engine(kind, model, tokenizer, stop_token_ids=stop_token_ids(tokenizer), model_path=model_path,
                       batch_size=cfg.distill.generation.batch_size)


def _generate(engine, prompts: list[list[int]], cfg: RunConfig, greedy: bool, seed: int | None = None):
    from posttrain.generation import sampling_params

    params = sampling_params(cfg.distill.generation, greedy=greedy, seed=seed)
    return [gs[0] for gs in engine.generate(prompts, params)] if prompts else []


def files_fingerprint(name: str) -> str | None:
    """A hash of a model's weight files (a folder, or a hub id in the local HF cache); None when none are found.

    For a teacher that only vLLM loads: hashing its tensors would mean loading it in torch as well.
    """
    from posttrain.data.dataset import file_digest

    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        except (OSError, ValueError):
            return None
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_digest(str(f))}".encode())
    return h.hexdigest()[:20]


def teacher_dataset(cfg: RunConfig, acc, tokenizer, prompts, eval_prompts, data_fingerprint: str, out: Path,
                    resume: bool, log):
    """Sequence mode: the teacher's responses to the prompts, as tokenized SFT sets (train, eval, report, fp).

    The responses go to ``<out>/distill/teacher_{train,eval}.jsonl`` (messages rows, each with the prompt
    row's source) with ``provenance.json``; a resumed run with the same settings reads them back instead of
    generating again. A response cut at ``max_new_tokens`` or empty is left out (counted in the provenance):
    it would teach the student not to stop, or to say nothing.
    """
    from posttrain.data.dataset import build_datasets

    d = cfg.distill
    folder = out / "distill"
    settings = {"teacher": d.teacher, "decoding": d.teacher_decoding, "generation": d.generation.model_dump(),
                "prompts_fingerprint": data_fingerprint, "seed": cfg.training.seed}
    splits = {"train": prompts, "eval": eval_prompts}
    files = {name: folder / f"teacher_{name}.jsonl" for name, ps in splits.items() if ps is not None}
    saved = folder / "provenance.json"
    if resume and saved.is_file() and json.loads(saved.read_text())["settings"] == settings:
        log(f"teacher responses read back from {folder}")
    else:
        _write_teacher_responses(cfg, acc, tokenizer, splits, files, settings, saved, log)
    acc.wait_for_everyone()
    # An eval split whose every response was left out has nothing to evaluate on.
    answered_eval = "eval" in files and files["eval"].stat().st_size > 0
    data = cfg.data.model_copy(update={
        "train": [DataSource(path=str(files["train"]), format="messages")],
        "eval": [DataSource(path=str(files["eval"]), format="messages")] if answered_eval else [],
        "eval_fraction": 0.0,
    })
    with acc.main_process_first():
        return build_datasets(data, tokenizer, "sft", cfg.training.seed, log=log)


def _write_teacher_responses(cfg: RunConfig, acc, tokenizer, splits: dict, files: dict, settings: dict,
                             saved: Path, log) -> None:
    from posttrain.generation import resolve_engine
    from posttrain.models.load import is_adapter_folder

    d = cfg.distill
    kind = resolve_engine(d.generation.engine, vllm_can_load=not is_adapter_folder(d.teacher))
    # vLLM loads its own copy from the files: a torch copy as well would hold the teacher twice on the GPU.
    teacher = None if kind == "vllm" else load_teacher(cfg, acc.device)
    engine = _engine(cfg, kind, teacher, tokenizer, d.teacher)
    counts = {}
    for name, path in files.items():
        ps = splits[name]
        mine = list(range(acc.process_index, len(ps), acc.num_processes))
        rows = [ps.row(i) for i in mine]
        gens = _generate(engine, [r["prompt_ids"] for r in rows], cfg, d.teacher_decoding == "greedy",
                         seed=cfg.training.seed)
        answered = gather_lists([(i, r, g.text, g.finish_reason) for i, r, g in zip(mine, rows, gens)],
                                acc.num_processes)
        answered.sort(key=lambda x: x[0])
        kept = [x for x in answered if x[3] == "stop" and x[2].strip()]
        counts[name] = {"prompts": len(answered), "kept": len(kept),
                        "cut_at_max_new_tokens": sum(x[3] != "stop" for x in answered),
                        "empty": sum(x[3] == "stop" and not x[2].strip() for x in answered)}
        if name == "train" and not kept:
            raise PosttrainError(
                f"distill.mode=sequence: the teacher finished none of its {len(answered)} responses within "
                f"distill.generation.max_new_tokens={d.generation.max_new_tokens} tokens; raise it, or check that "
                f"the teacher ends its turns with the chat template's end-of-turn token"
            )
        log(f"teacher answered {len(kept)} of {len(answered)} {name} prompts ({path})")
        if acc.is_main_process:
            lines = []
            for _, r, text, _ in kept:
                row = {"messages": [*r["prompt"], {"role": "assistant", "content": text}], "source": r["source"],
                       "teacher": d.teacher}
                if r.get("reference") is not None:
                    row["reference"] = r["reference"]
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            atomic_write_text(path, "".join(lines))
    if acc.is_main_process:
        weights = ({"teacher_files": files_fingerprint(d.teacher)} if teacher is None
                   else {"teacher_weights": weights_fingerprint(teacher)})
        info = {"settings": settings, **weights, "counts": counts, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # Written last: its presence says the response files are complete.
        atomic_write_text(saved, json.dumps(info, indent=2))
    del teacher, engine


# ---- on-policy distillation ------------------------------------------------------------------------------------


def _prompt_ids(row) -> list[int]:
    """A row's prompt: a prompt row's own, or everything before a token row's first trained token."""
    if isinstance(row, dict):
        return row["prompt_ids"]
    ids, labels = row[0][0], row[0][1]
    first = next((j for j, x in enumerate(labels) if x != IGNORE_INDEX), len(ids))
    return ids[:first]


def answered_sample(prompt: list[int], completion: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + completion, only the completion trained, cut to ``max_len`` tokens.

    A prompt row leaves room for ``max_new_tokens`` when it is loaded, but a token row's prompt (everything
    before its response) may be nearly ``max_len`` long: its sample keeps the tokens that fit.
    """
    kept = list(completion[: max(0, max_len - len(prompt))])
    return prompt + kept, [IGNORE_INDEX] * len(prompt) + kept


class OnPolicyDistillTrainer(Trainer):
    """GKD: each step, with probability ``student_fraction``, the student answers the step's prompts itself and
    the teacher's divergence is taken on those answers; otherwise on the data's responses."""

    def __init__(self, cfg: RunConfig, accelerator, model, tokenizer, method: DistillMethod, train_set, eval_set, *,
                 engine, log=print):
        super().__init__(cfg, accelerator, model, tokenizer, method, train_set, eval_set, log=log)
        self.engine = engine
        self.dcfg = cfg.distill
        self.rollout_stats: dict = {}

    def _sample(self, prompts: list[list[int]], greedy: bool) -> list:
        self.engine.sync_weights(unwrap(self.model))
        return _generate(self.engine, prompts, self.cfg, greedy)

    def _micro_batches(self, global_batch: list[int]) -> list[dict[str, torch.Tensor]]:
        parts = split_global_batch(
            global_batch, self.lengths, self.tcfg.gradient_accumulation_steps, self.world, self.acc.process_index
        )
        rows = [[self.train_set.row(r) for r in part] for part in parts]
        # The same draw on every process (it depends on the step only): a step is on-policy everywhere or nowhere.
        draw = random.Random(f"{self.tcfg.seed}-on-policy-{self.state.step}").random()
        on_policy = draw < self.dcfg.student_fraction
        self.rollout_stats = {"on_policy": float(on_policy)}
        if not on_policy:
            return [self.method.collate(part) for part in rows]
        prompts = [[_prompt_ids(row) for row in part] for part in rows]
        gens = self._sample([p for part in prompts for p in part], greedy=False)
        answers = iter([list(g.completion_ids) for g in gens])
        max_len = self.cfg.data.max_seq_len
        samples = [[answered_sample(p, c, max_len) for p, c in zip(part, answers)] for part in prompts]
        kept = sum(len(ids) - len(p) for part, ps in zip(samples, prompts) for (ids, _), p in zip(part, ps))
        total, n = self._global_sum([float(kept), float(len(gens))])
        self.rollout_stats["response_length"] = total / max(n, 1)
        return [self.method.collate([[sample] for sample in part]) for part in samples]

    def _apply_update(self, step_loss: float, step_metrics: dict, global_tokens: float, started: float) -> dict:
        return super()._apply_update(step_loss, {**step_metrics, **self.rollout_stats}, global_tokens, started)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """On prompt data: the divergence on the student's greedy answers to the eval prompts; else the loop's."""
        from posttrain.data.dataset import TokenizedSet
        from posttrain.data.prompts import PromptSet

        if not isinstance(self.eval_set, PromptSet):
            return super().evaluate()
        mine = list(range(self.acc.process_index, len(self.eval_set), self.world))
        prompts = [self.eval_set.row(i)["prompt_ids"] for i in mine]
        gens = self._sample(prompts, greedy=True)
        seqs = gather_lists([(i, p, list(g.completion_ids)) for i, p, g in zip(mine, prompts, gens)], self.world)
        seqs.sort(key=lambda x: x[0])
        samples = [answered_sample(p, c, self.cfg.data.max_seq_len) for _, p, c in seqs]
        answers = TokenizedSet([np.asarray(ids, np.int32) for ids, _ in samples],
                               [np.asarray(labels, np.int32) for _, labels in samples],
                               [[i] for i in range(len(samples))])
        saved, self.eval_set = self.eval_set, answers
        try:
            return super().evaluate()
        finally:
            self.eval_set = saved


# ---- wiring ---------------------------------------------------------------------------------------------------------


def make_method(cfg: RunConfig, acc, model, tokenizer, sets: dict, cache: Path, log) -> DistillMethod:
    """The plug-in of logit and on-policy distillation; ``sets`` gets the top-k-carrying sets when the teacher is
    cached. (Sequence mode trains with the SFT plug-in.)

    Called with the starting student, before any tuning transform (its vocabulary size bounds the cache).
    """
    if cfg.distill.teacher_cache == "topk":
        vocab = attach_topk_cache(sets, cfg, model, cache, device=acc.device, autocast=acc.autocast,
                                  pad_id=tokenizer.pad_token_id, log=log, rank=acc.process_index,
                                  world=acc.num_processes)
        return DistillMethod(tokenizer.pad_token_id, cfg, vocab=vocab)
    return DistillMethod(tokenizer.pad_token_id, cfg, load_teacher(cfg, acc.device))


def make_trainer(cfg: RunConfig, acc, model, tokenizer, method, train_set, eval_set, log, strategy=None):
    """The loop itself for logit and sequence distillation; ``OnPolicyDistillTrainer`` with its engine for GKD
    (whole weights on every process: DDP's ``strategy``, the default)."""
    if cfg.distill.mode != "on_policy":
        return Trainer(cfg, acc, model, tokenizer, method, train_set, eval_set, log=log, strategy=strategy)
    from posttrain.generation import resolve_engine

    kind = resolve_engine(cfg.distill.generation.engine, vllm_can_load=cfg.tuning.mode in VLLM_MODES)
    engine = _engine(cfg, kind, model, tokenizer, cfg.model.name_or_path)
    return OnPolicyDistillTrainer(cfg, acc, model, tokenizer, method, train_set, eval_set, engine=engine, log=log)
