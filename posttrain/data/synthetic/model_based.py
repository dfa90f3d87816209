"""Data written by a model: ``posttrain synth answers`` and ``synth pairs`` (``synth self-instruct`` lives in
``self_instruct.py`` and shares this module's plumbing).

- answers: each prompt's response(s), written as ``messages`` or ``alpaca`` rows.
- pairs: ``samples`` responses per prompt, scored by rewards (a rule with the row's reference answer, a
  reward model, an LLM judge, a Python function: ``posttrain.rl.rewards``) or ranked by a pairwise LLM
  judge (in a round robin, the share of its decided comparisons each response won); the best and the
  worst form a ``preference`` row. A prompt whose scored responses all tie, or that has fewer than two
  scored responses, gives no row and is counted.

Prompts come from rows of format ``prompt``, ``messages``, ``alpaca`` or ``multitask``, told apart per row by
their keys (``prompt``, ``messages``/``conversations``, ``instruction``, ``input`` + ``output``). A prompt
needs no answer: a conversation may end with a user (or tool) turn and an alpaca row may have no
``output`` (Self-Instruct's own seed file has none). When a conversation ends with an assistant turn, the
prompt is everything before it and that turn is the reference answer. Unusable rows are dropped and
reported; none usable is an error. Empty responses are always dropped, and responses cut off at
``max_new_tokens`` unless ``keep_truncated``; every drop is counted in the summary.

Every row written carries ``source`` (a one-line provenance, as the rule-based generators write) and
``synth`` (generator, model, seed, prompt row, sample index, scores, ...); the loaders ignore both. Pairs
also carry ``score_chosen`` / ``score_rejected``, which the ``preference`` format reads as the pair's scores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.report import DataReport, RowIssue
from posttrain.data.synthetic.settings import AnswerSettings, PairSettings, SamplingSettings
from posttrain.errors import DataError, MissingExtraError, PosttrainError

_CONVERSATION_KEYS = ("messages", "conversations", "instruction", "input", "output", "system", "history")
# The provenance of a row this tool wrote earlier describes that row, not the one generated from it.
_PROVENANCE_KEYS = ("source", "synth")
# Stands in for the missing answer of a prompt row while the training schema checks the rest of the row.
_NO_ANSWER = "(no answer)"
_SHAPES = ("expected 'prompt' (format prompt), 'messages' or 'conversations' (format messages), 'instruction' "
           "(format alpaca) or 'input' and 'output' (format multitask)")


@dataclass
class PromptRow:
    """A prompt to answer, with where it came from and what the rewards may need."""

    file: str
    row: int
    prompt: list[dict]  # messages, ending with a user (or tool) turn
    reference: str | None = None
    metadata: dict = field(default_factory=dict)
    instruction: str | None = None  # an alpaca / multitask row's own instruction, without its input

    @property
    def where(self) -> str:
        return f"{self.file}:{self.row}"


def read_prompt_rows(path: str | Path, what: str = "prompts") -> tuple[list[PromptRow], DataReport]:
    """The usable prompts of a data file and the report of the rows dropped; a ``DataError`` when none is usable."""
    from posttrain.data.formats import normalise
    from posttrain.data.loading import read_rows

    if not Path(path).is_file():
        raise PosttrainError(f"{what} file {path}: no such file")
    file, report, rows = str(path), DataReport(), []
    report.read(file, 0)
    for row_no, raw in read_rows(path):
        report.read(file)
        if isinstance(raw, RowIssue):
            report.drop(raw)
            continue
        fmt = ("prompt" if "prompt" in raw else "messages" if "messages" in raw or "conversations" in raw
               else "alpaca" if "instruction" in raw else "multitask" if "input" in raw and "output" in raw else None)
        if fmt is None:
            report.drop(RowIssue(file, row_no, "", "unknown row shape", f"{_SHAPES}; got keys {sorted(raw)}"))
            continue
        answered = _with_placeholder_answer(raw, fmt)
        result = normalise(answered or raw, fmt, file=file, row_no=row_no)
        if isinstance(result, list):
            report.drop(result[0])
            continue
        if fmt == "prompt":
            metadata = {k: v for k, v in (result.metadata or {}).items() if k not in _PROVENANCE_KEYS}
            rows.append(PromptRow(file, row_no, result.prompt, result.reference, metadata))
        else:
            last = max(i for i, m in enumerate(result.messages) if m["role"] == "assistant")
            reference = None if answered else result.messages[last]["content"]
            metadata = {k: v for k, v in raw.items() if k not in _CONVERSATION_KEYS + _PROVENANCE_KEYS}
            instruction = raw.get("instruction") if fmt in ("alpaca", "multitask") else None
            instruction = instruction.strip() if isinstance(instruction, str) else None
            rows.append(PromptRow(file, row_no, result.messages[:last], reference, metadata, instruction or None))
        report.kept(file)
    if not rows:
        raise DataError(f"no usable rows in the {what} file {file} ({_SHAPES}).\n{report.format(what)}")
    return rows, report


def _with_placeholder_answer(raw: dict, fmt: str) -> dict | None:
    """An unanswered prompt row (an alpaca row without ``output``, a conversation ending with a user or tool
    turn) with ``_NO_ANSWER`` as its answer, so the training schema checks the rest; None for any other row."""
    from posttrain.data.formats import DEFAULT_ROLE_MAP

    if fmt == "alpaca":
        output = raw.get("output")
        if output is None or (isinstance(output, str) and not output.strip()):
            return {**raw, "output": _NO_ANSWER}
        return None
    if fmt != "messages":
        return None
    key = "messages" if raw.get("messages") is not None else "conversations"
    turns = raw.get(key)
    if not (isinstance(turns, list) and turns and isinstance(turns[-1], dict)):
        return None
    openai = key == "messages"
    role = turns[-1].get("role") if openai else DEFAULT_ROLE_MAP.get(str(turns[-1].get("from")))
    if role not in ("user", "tool"):
        return None
    answer = {"role": "assistant", "content": _NO_ANSWER} if openai else {"from": "assistant", "value": _NO_ANSWER}
    return {**raw, key: [*turns, answer]}


class Sampler:
    """Chat prompts in, sampled responses out, through any generation engine (``posttrain.generation``)."""

    def __init__(self, engine, tokenizer, model: str, context: int | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model = model
        self.context = context

    def encode(self, prompt: list[dict], max_new_tokens: int) -> list[int] | tuple[str, str]:
        """The prompt's token ids, rendered for generation; or (reason, detail) why it cannot be sampled from."""
        from posttrain.data.prompts import render_prompt

        try:
            ids = render_prompt(self.tokenizer, prompt)
        except Exception as exc:  # noqa: BLE001 - a chat template is user code and can raise anything
            return "chat template error", f"{type(exc).__name__}: {exc}"
        if self.context is not None and len(ids) + max_new_tokens > self.context:
            return "prompt too long", f"{len(ids)} tokens + {max_new_tokens} new exceed the context of {self.context}"
        return ids

    def encode_rows(self, rows: list[PromptRow], max_new_tokens: int, report: DataReport) -> list[tuple]:
        """(row, token ids) of every row that can be sampled from; the others are dropped into ``report``."""
        encoded = []
        for row in rows:
            ids = self.encode(row.prompt, max_new_tokens)
            if isinstance(ids, tuple):
                report.drop(RowIssue(row.file, row.row, "prompt", *ids))
                report.unkeep(row.file)
            else:
                encoded.append((row, ids))
        if not encoded:
            raise DataError(f"no prompt can be sampled from.\n{report.format('prompts')}")
        return encoded

    def generate(self, ids: list[list[int]], params) -> list:
        return self.engine.generate(ids, params) if ids else []


def load_sampler(model: str, settings: SamplingSettings) -> Sampler:
    """The model (a folder, a hub id or a training run's output dir) behind the engine ``settings.engine`` names."""
    import torch
    from transformers import AutoConfig

    from posttrain.config import ModelConfig
    from posttrain.generation import make_engine, stop_token_ids
    from posttrain.models.load import is_adapter_folder, load_model, load_tokenizer

    kind = settings.engine
    has_vllm = importlib.util.find_spec("vllm") is not None
    if kind == "auto":
        kind = "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    if kind == "vllm" and not has_vllm:
        raise MissingExtraError("vllm", "vllm", "posttrain synth --engine vllm")
    if kind == "vllm" and not torch.cuda.is_available():
        raise PosttrainError("--engine vllm needs a CUDA GPU; none is visible (use --engine transformers)")
    path = str(Path(model) / "final") if (Path(model) / "final").is_dir() else model
    with _named_by_option(model, path):
        tokenizer = load_tokenizer(ModelConfig(name_or_path=path))
    if not getattr(tokenizer, "chat_template", None):
        raise PosttrainError(f"--model {model}: its tokenizer has no chat template; the generators prompt a chat "
                             "model (set one in tokenizer_config.json, or use an instruction-tuned model)")
    stops = stop_token_ids(tokenizer)
    if kind == "vllm":
        if is_adapter_folder(path):
            raise PosttrainError(f"--model {model} is an adapter: vLLM loads full models; merge it first "
                                 "(posttrain export) or use --engine transformers")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"cannot read the config of --model {model}: {exc}") from None
        engine = make_engine("vllm", None, tokenizer, stop_token_ids=stops, model_path=path)
        return Sampler(engine, tokenizer, model, context_length(config))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    with _named_by_option(model, path):
        policy = load_model(ModelConfig(name_or_path=path, dtype=dtype)).to(device)
    engine = make_engine("transformers", policy, tokenizer, stop_token_ids=stops, batch_size=settings.batch_size)
    return Sampler(engine, tokenizer, model, context_length(policy.config))


def context_length(config) -> int | None:
    """The tokens a model attends over (its text config's ``max_position_embeddings``); None when unknown.

    Not the tokenizer's ``model_max_length``, which many tokenizers leave at a placeholder of 1e30.
    """
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


@contextlib.contextmanager
def _named_by_option(model: str, path: str):
    """Loading errors name the command's ``--model``, not the training config's field."""
    try:
        yield
    except PosttrainError as exc:
        raise PosttrainError(str(exc).replace(f"model.name_or_path={path!r}", f"--model {model}")) from None


def progress_bar(total: int, desc: str, enabled: bool | None, unit: str):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)


def response_problem(generation, keep_truncated: bool, what: str = "answer") -> str | None:
    if not generation.text.strip():
        return f"empty {what}"
    if generation.finish_reason == "length" and not keep_truncated:
        return f"truncated {what} (hit --max-new-tokens)"
    return None


def sampling_params(settings: SamplingSettings, rng: random.Random, *, n: int = 1, max_new_tokens=None,
                    temperature=None):
    from posttrain.generation.base import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens or settings.max_new_tokens,
                          temperature=settings.temperature if temperature is None else temperature,
                          top_p=settings.top_p, n=n, seed=rng.randrange(2**31))


def provenance(generator: str, sampler: Sampler, settings: SamplingSettings, **fields) -> dict:
    return {"generator": generator, "model": sampler.model, "seed": settings.seed, **fields}


def source_line(generator: str, sampler: Sampler, settings: SamplingSettings) -> str:
    return f"posttrain synth {generator}: {sampler.model}, seed {settings.seed}"


# ---- answers ------------------------------------------------------------------------------------------------


def alpaca_fields(prompt: list[dict], where: str) -> dict:
    """The ``alpaca`` fields (system, history, instruction) of a prompt; an error naming the row if it has none."""
    turns = list(prompt)
    fields: dict = {}
    if turns and turns[0]["role"] == "system":
        fields["system"] = turns.pop(0)["content"]
    roles = [m["role"] for m in turns]
    if len(roles) % 2 == 0 or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise PosttrainError(f"{where}: a prompt of turns {roles} cannot be written as alpaca (it holds alternating "
                             "user and assistant turns ending with a user turn); use --format messages")
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    if history:
        fields["history"] = history
    return {**fields, "instruction": turns[-1]["content"], "input": ""}


def answer_row(prompt: list[dict], answer: str, fmt: str, where: str) -> dict:
    if fmt == "alpaca":
        return {**alpaca_fields(prompt, where), "output": answer}
    return {"messages": [*prompt, {"role": "assistant", "content": answer}]}


def generate_answers(sampler: Sampler, encoded: list[tuple], settings: AnswerSettings) -> tuple[list[dict], Counter]:
    """``settings.samples`` answers per (prompt row, ids); (rows to write, dropped answers per reason)."""
    if settings.format == "alpaca":
        for row, _ in encoded:  # before any generation: a prompt that cannot be written is the user's to fix now
            alpaca_fields(row.prompt, row.where)
    rng = random.Random(settings.seed)
    out: list[dict] = []
    drops: Counter = Counter()
    bar = progress_bar(len(encoded), "answers", settings.progress, "prompt")
    for start in range(0, len(encoded), settings.batch_size):
        batch = encoded[start:start + settings.batch_size]
        params = sampling_params(settings, rng, n=settings.samples)
        for (row, _), generations in zip(batch, sampler.generate([ids for _, ids in batch], params)):
            for k, g in enumerate(generations):
                problem = response_problem(g, settings.keep_truncated)
                if problem:
                    drops[problem] += 1
                    continue
                synth = provenance("answers", sampler, settings, prompt=row.where, sample=k,
                                   temperature=settings.temperature, finish_reason=g.finish_reason,
                                   **({"metadata": row.metadata} if row.metadata else {}))
                out.append({**answer_row(row.prompt, g.text, settings.format, row.where),
                            "source": source_line("answers", sampler, settings), "synth": synth})
        bar.update(len(batch))
    bar.close()
    return out, drops


# ---- pairs --------------------------------------------------------------------------------------------------


def reward_specs(values: list[str]) -> list[dict]:
    """``--reward`` values as reward specs: a type name, a reward model folder (or its run), a YAML/JSON mapping
    (or list), or a .yaml/.yml/.json file holding one."""
    import yaml

    specs: list[dict] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            folder = path / "final" if (path / "final").is_dir() else path
            specs.append({"type": "reward_model", "path": str(folder)})
            continue
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            text, where = path.read_text(encoding="utf-8"), str(path)
        elif value.lstrip().startswith(("{", "[")):
            text, where = value, "the spec"
        elif re.fullmatch(r"[a-z_]+", value):
            specs.append({"type": value})
            continue
        else:
            raise PosttrainError(f"--reward {value!r}: not a reward type, a reward model folder, a YAML/JSON spec or "
                                 "a spec file; e.g. --reward exact_match, --reward runs/rm, "
                                 "--reward '{type: regex, pattern: \"^[0-9]+$\"}'")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PosttrainError(f"--reward {value!r}: {where} is not valid YAML/JSON ({exc})") from None
        items = loaded if isinstance(loaded, list) else [loaded]
        for item in items:
            if not isinstance(item, dict):
                raise PosttrainError(f"--reward {value!r}: expected a mapping such as {{type: exact_match}}, "
                                     f"got {item!r}")
        specs.extend(items)
    return specs


class Ranker:
    """Scores for every prompt's responses: a weighted sum of rewards, or wins of a pairwise judge."""

    def __init__(self, specs: list[dict]):
        from posttrain.rl.rewards import build_rewards, pairwise_judge

        pairwise = [i for i, s in enumerate(specs) if s.get("type") == "pairwise_judge"]
        if pairwise and len(specs) > 1:
            raise PosttrainError("--reward: a pairwise_judge ranks responses by itself and cannot be combined with "
                                 "other rewards; give it alone")
        self.judge = None
        self.rewards = None
        if pairwise:
            spec = {k: v for k, v in specs[0].items() if k != "type"}
            self.judge = pairwise_judge(spec, "--reward (type pairwise_judge)")
            self.names = ["pairwise_judge"]
        else:
            self.rewards = build_rewards(specs)
            self.names = list(self.rewards.names)
        self.errors: list[str] = []

    def __call__(self, rows: list[PromptRow], texts: list[list[str]]) -> list[list[float | None]]:
        if self.judge is not None:
            return [self._wins(row, options) for row, options in zip(rows, texts)]
        from posttrain.rl.rewards import RewardInput

        inputs = [RewardInput(prompt=row.prompt, completion=t, reference=row.reference, metadata=row.metadata)
                  for row, options in zip(rows, texts) for t in options]
        result = self.rewards(inputs)
        self._keep_errors(result.errors)
        scores, at = [], 0
        for options in texts:
            scores.append(result.total[at:at + len(options)])
            at += len(options)
        return scores

    def _keep_errors(self, errors: list[str]) -> None:
        for error in errors:
            if len(self.errors) < 5 and error not in self.errors:
                self.errors.append(error)

    def _wins(self, row: PromptRow, options: list[str]) -> list[float | None]:
        """A round robin: every pair asked in both orders (``PairwiseJudge``). A sample's score is the share of
        its decided comparisons that it won; None when none of its comparisons was decided (the judge failed,
        or its two verdicts disagreed): an undecided comparison is no loss."""
        pairs = [(i, j) for i in range(len(options)) for j in range(i + 1, len(options))]
        verdicts = self.judge.compare_many([(row.prompt, options[i], options[j]) for i, j in pairs])
        self._keep_errors(self.judge.last_errors)
        wins, decided = [0] * len(options), [0] * len(options)
        for (i, j), verdict in zip(pairs, verdicts):
            if verdict is not None:
                wins[j if verdict else i] += 1
                decided[i] += 1
                decided[j] += 1
        return [w / d if d else None for w, d in zip(wins, decided)]


FEWER_SCORED = "fewer than 2 scored responses"
UNDECIDED = "the pairwise judge decided no comparison"


def best_and_worst(scores: list[float | None]) -> tuple[int, int] | str:
    """Indices of the highest and lowest score (the first of equals), or why the prompt gives no pair."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return FEWER_SCORED
    best = max(scored, key=lambda x: (x[0], -x[1]))
    worst = min(scored, key=lambda x: (x[0], x[1]))
    if best[0] == worst[0]:
        return "all responses tie"
    return best[1], worst[1]


def _prompt_field(prompt: list[dict]) -> str | list[dict]:
    return prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else prompt


def generate_pairs(sampler: Sampler, encoded: list[tuple], ranker: Ranker,
                   settings: PairSettings) -> tuple[list[dict], Counter]:
    """Preference rows, best vs worst of ``settings.samples`` responses to each (prompt row, ids);
    (rows, skipped prompts and dropped samples per reason)."""
    rng = random.Random(settings.seed)
    out: list[dict] = []
    counts: Counter = Counter()
    bar = progress_bar(len(encoded), "pairs", settings.progress, "prompt")
    for start in range(0, len(encoded), settings.batch_size):
        batch = [row for row, _ in encoded[start:start + settings.batch_size]]
        prompt_ids = [ids for _, ids in encoded[start:start + settings.batch_size]]
        generations = sampler.generate(prompt_ids, sampling_params(settings, rng, n=settings.samples))
        kept = []  # per prompt: the usable samples as (sample index, generation)
        for gs in generations:
            usable = []
            for k, g in enumerate(gs):
                problem = response_problem(g, settings.keep_truncated, "response")
                if problem:
                    counts[f"sample dropped: {problem}"] += 1
                else:
                    usable.append((k, g))
            kept.append(usable)
        scores = ranker(batch, [[g.text for _, g in usable] for usable in kept])
        for row, usable, row_scores in zip(batch, kept, scores):
            picked = best_and_worst(row_scores)
            if picked == FEWER_SCORED and ranker.judge is not None and len(usable) >= 2:
                picked = UNDECIDED  # the responses were there; the judge did not rank any two of them
            if isinstance(picked, tuple) and usable[picked[0]][1].text == usable[picked[1]][1].text:
                picked = "all responses tie"
            if isinstance(picked, str):
                counts[f"prompt skipped: {picked}"] += 1
                continue
            (ci, chosen), (ri, rejected) = usable[picked[0]], usable[picked[1]]
            synth = provenance("pairs", sampler, settings, prompt=row.where, samples=settings.samples,
                               chosen_sample=ci, rejected_sample=ri, reward=ranker.names,
                               scores={str(k): s for (k, _), s in zip(usable, row_scores)},
                               reference=row.reference, **({"metadata": row.metadata} if row.metadata else {}))
            out.append({"prompt": _prompt_field(row.prompt), "chosen": chosen.text, "rejected": rejected.text,
                        "score_chosen": row_scores[picked[0]], "score_rejected": row_scores[picked[1]],
                        "source": source_line("pairs", sampler, settings), "synth": synth})
        bar.update(len(batch))
    bar.close()
    return out, counts


# ---- files in, file out -------------------------------------------------------------------------------------


@dataclass
class Summary:
    title: str
    out: Path
    written: int
    counts: Counter
    inputs: DataReport | None = None
    notes: list[str] = field(default_factory=list)

    def details(self) -> list[str]:
        lines = [f"  {n} x {reason}" for reason, n in sorted(self.counts.items(), key=lambda x: (-x[1], x[0]))]
        if self.inputs is not None and self.inputs.total_dropped:
            lines.append("  " + self.inputs.format("input").replace("\n", "\n  "))
        return lines + [f"  {note}" for note in self.notes]

    def format(self) -> str:
        return "\n".join([f"{self.title}: {self.written} rows -> {self.out}", *self.details()])


def check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix != ".jsonl":
        raise PosttrainError(f"--out {out}: the generators write JSON Lines; name the file *.jsonl")
    return out


def write_summary(summary: Summary, rows: list[dict]) -> Summary:
    """Write the rows (atomically); with none to write, an error that says what was dropped and why."""
    from posttrain.data.synthetic import write_jsonl

    if not rows:
        raise PosttrainError("\n".join([f"{summary.title}: no row to write to {summary.out}", *summary.details()]))
    write_jsonl(rows, summary.out)
    return summary


def run_answers(model: str, prompts: str | Path, out: str | Path, settings: AnswerSettings,
                sampler: Sampler | None = None) -> Summary:
    out = check_out(out)
    rows, report = read_prompt_rows(prompts)
    sampler = sampler or load_sampler(model, settings)
    encoded = sampler.encode_rows(rows, settings.max_new_tokens, report)
    written, drops = generate_answers(sampler, encoded, settings)
    return write_summary(Summary(f"synth answers ({len(encoded)} prompts, {settings.samples} each)", out,
                                 len(written), drops, report), written)


def run_pairs(model: str, prompts: str | Path, out: str | Path, rewards: list[str], settings: PairSettings,
              sampler: Sampler | None = None) -> Summary:
    out = check_out(out)
    rows, report = read_prompt_rows(prompts)
    ranker = Ranker(reward_specs(rewards))
    sampler = sampler or load_sampler(model, settings)
    encoded = sampler.encode_rows(rows, settings.max_new_tokens, report)
    written, counts = generate_pairs(sampler, encoded, ranker, settings)
    notes = [f"reward error: {e}" for e in ranker.errors]
    if counts.get(f"prompt skipped: {FEWER_SCORED}") and not any(r.reference for r in rows):
        notes.append("no prompt row has a reference answer ('reference' or 'answer'): rule rewards such as "
                     "exact_match cannot score without one")
    title = (f"synth pairs ({len(encoded)} prompts, {settings.samples} samples each, "
             f"ranked by {', '.join(ranker.names)})")
    return write_summary(Summary(title, out, len(written), counts, report, notes), written)
