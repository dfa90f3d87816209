"""Evaluation suites: each takes a model and its tokenizer and returns metrics, a headline and samples.

- ``perplexity``: per-token NLL of held-out text (or of the assistant turns of chat data) -> perplexity.
- ``generation``: greedy answers to prompts, scored by reward specs (exact match, numeric match,
  regex, a Python function, ...) as the online methods use them.
- ``multiple_choice``: the option with the highest log-likelihood after the prompt is the answer;
  ``accuracy`` sums the option's token log-probs, ``accuracy_norm`` divides by its characters.
- ``reward_model``: greedy answers scored by a reward model.
- ``win_rate``: greedy answers against a baseline model's, decided by a pairwise LLM judge (asked
  in both orders) or by a reward model; a tie or undecided pair counts half.
- ``lm_eval``: tasks of lm-evaluation-harness (an optional extra), when installed.

``perplexity`` and ``generation`` also report each metric per task (``perplexity/<task>``,
``exact_match/<task>``, ...) when rows carry a ``task`` field; the headline stays the metric over all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import DataConfig, EvalSuite
from posttrain.data.collate import collate
from posttrain.data.prompts import last_user_text
from posttrain.data.report import DataReport
from posttrain.data.templates import IGNORE_INDEX
from posttrain.errors import DataError, PosttrainError

@dataclass
class SuiteResult:
    metrics: dict[str, float]
    n: int
    metric: str
    higher_is_better: bool = True
    samples: list[dict] = field(default_factory=list)
    skipped: str | None = None


def run_suite(suite: EvalSuite, model, tokenizer, *, max_seq_len: int) -> SuiteResult:
    """Evaluate ``model`` on one suite. The model is put in eval mode and left there."""
    model.eval()
    if suite.type == "lm_eval":
        return _lm_eval(suite, model, tokenizer)
    if suite.type == "perplexity":
        return _perplexity(suite, model, tokenizer, max_seq_len)
    if suite.type == "multiple_choice":
        return _multiple_choice(suite, model, tokenizer)
    return _generated(suite, model, tokenizer)


# ---- perplexity ------------------------------------------------------------------------------------


def _perplexity(suite: EvalSuite, model, tokenizer, max_seq_len: int) -> SuiteResult:
    from posttrain.data.dataset import _Encoder
    from posttrain.data.validate import load_examples

    report = DataReport()
    examples, _ = load_examples(suite.path, suite.format or "text", report=report)
    encoder = _Encoder(tokenizer, DataConfig(train=[suite.path], max_seq_len=max_seq_len), report)
    samples, tasks = [], []
    for ex in examples[: suite.limit]:
        mine = encoder(ex)
        samples += mine
        tasks += [ex.task] * len(mine)
    if not samples:
        raise DataError(f"eval suite {suite.name!r}: {suite.path} gave no text to score\n{report.format('eval')}")
    nll = [0.0] * len(samples)
    counts = [0] * len(samples)
    for k in range(0, len(samples), suite.batch_size):
        part = samples[k : k + suite.batch_size]
        batch = collate([[(s.input_ids, s.labels)] for s in part], tokenizer.pad_token_id or 0)
        lp, mask = _token_logps(model, batch)
        nll[k : k + len(part)] = (-(lp * mask).sum(-1)).tolist()
        counts[k : k + len(part)] = mask.sum(-1).long().tolist()
    metrics = _nll_metrics(nll, counts)
    for task in sorted({t for t in tasks if t is not None}):
        mine = [i for i, t in enumerate(tasks) if t == task]
        metrics.update({f"{k}/{task}": v for k, v in _nll_metrics([nll[i] for i in mine],
                                                                   [counts[i] for i in mine]).items()})
    return SuiteResult(metrics, len(samples), "perplexity", higher_is_better=False)


def _nll_metrics(nll: list[float], counts: list[int]) -> dict[str, float]:
    loss = sum(nll) / max(sum(counts), 1)
    return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "tokens": float(sum(counts))}


@torch.no_grad()
def _token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from posttrain.models.logprobs import per_token_logps

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"].to(device)
    return per_token_logps(logits, labels).float().cpu(), (labels[:, 1:] != IGNORE_INDEX).float().cpu()


# ---- multiple choice ------------------------------------------------------------------------------


def _choice_rows(suite: EvalSuite) -> list[dict]:
    """{"prompt", "choices", "answer" (index)} from rows of question/prompt, choices, answer (index or text)."""
    from posttrain.data.loading import read_rows

    rows = []
    for row_no, row in read_rows(suite.path):
        where = f"{suite.path}:{row_no}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: {getattr(row, 'detail', row)}")
        prompt = row.get("prompt", row.get("question"))
        choices = row.get("choices")
        answer = row.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field 'prompt' (or 'question'): missing or empty")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise DataError(f"{where}: field 'choices': expected a list of at least 2 non-empty strings")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer': expected an index into choices (0..{len(choices) - 1}) "
                            f"or one of the choices; got {answer!r}")
        rows.append({"prompt": prompt, "choices": choices, "answer": answer})
        if suite.limit and len(rows) >= suite.limit:
            break
    if not rows:
        raise DataError(f"eval suite {suite.name!r}: {suite.path} has no rows")
    return rows


def _multiple_choice(suite: EvalSuite, model, tokenizer) -> SuiteResult:
    from posttrain.data.prompts import render_prompt

    rows = _choice_rows(suite)
    seqs, owner = [], []
    for i, row in enumerate(rows):
        prompt_ids = render_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])
        for choice in row["choices"]:
            ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            seqs.append((prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids))
            owner.append(i)
    scores = []
    for k in range(0, len(seqs), suite.batch_size):
        lp, _ = _token_logps(model, collate([[s] for s in seqs[k : k + suite.batch_size]],
                                            tokenizer.pad_token_id or 0))
        scores += lp.sum(-1).tolist()
    right = right_norm = 0
    samples = []
    at = 0
    for row in rows:
        own = scores[at : at + len(row["choices"])]
        at += len(row["choices"])
        pick = max(range(len(own)), key=own.__getitem__)
        pick_norm = max(range(len(own)), key=lambda j: own[j] / max(len(row["choices"][j]), 1))
        right += pick == row["answer"]
        right_norm += pick_norm == row["answer"]
        samples.append({"prompt": row["prompt"], "reference": row["choices"][row["answer"]],
                        "completion": row["choices"][pick], "score": float(pick == row["answer"])})
    n = len(rows)
    return SuiteResult({"accuracy": right / n, "accuracy_norm": right_norm / n}, n, "accuracy", samples=samples)


# ---- generation, reward model, win rate ---------------------------------------------------------------


def _prompts(suite: EvalSuite) -> list:
    from posttrain.data.validate import load_examples

    examples, report = load_examples(suite.path, "prompt")
    if not examples:
        raise DataError(f"eval suite {suite.name!r}: {suite.path} has no usable prompt\n{report.format('eval')}")
    return examples[: suite.limit]


def greedy_answers(model, tokenizer, prompts: list, suite: EvalSuite) -> list[str]:
    """Greedy responses (text) to each prompt's messages, stopping at the template's end of turn."""
    from posttrain.data.prompts import render_prompt
    from posttrain.generation.base import SamplingParams
    from posttrain.generation import stop_token_ids
    from posttrain.generation.transformers_engine import TransformersEngine

    engine = TransformersEngine(model, tokenizer, stop_token_ids=stop_token_ids(tokenizer),
                                batch_size=suite.batch_size)
    ids = [render_prompt(tokenizer, p.prompt) for p in prompts]
    out = engine.generate(ids, SamplingParams(max_new_tokens=suite.max_new_tokens, temperature=0.0))
    return [gs[0].text for gs in out]


def _inputs(prompts: list, answers: list[str]) -> list:
    from posttrain.rl.rewards import RewardInput

    return [RewardInput(prompt=p.prompt, completion=a, reference=p.reference, metadata=p.metadata or {})
            for p, a in zip(prompts, answers)]


def _generated(suite: EvalSuite, model, tokenizer) -> SuiteResult:
    prompts = _prompts(suite)
    answers = greedy_answers(model, tokenizer, prompts, suite)
    if suite.type == "generation":
        return _scored(suite, prompts, answers)
    if suite.type == "reward_model":
        from posttrain.rl.rewards import RewardModelReward

        scores = RewardModelReward(suite.reward_model, batch_size=suite.batch_size)(_inputs(prompts, answers))
        ok = [s for s in scores if s is not None]
        samples = [{"prompt": last_user_text(p.prompt), "reference": p.reference, "completion": a, "score": s}
                   for p, a, s in zip(prompts, answers, scores)]
        return SuiteResult({"reward": sum(ok) / max(len(ok), 1)}, len(ok), "reward", samples=samples)
    return _win_rate(suite, prompts, answers)


def _scored(suite: EvalSuite, prompts: list, answers: list[str]) -> SuiteResult:
    from posttrain.rl.rewards import build_rewards

    try:
        scorer = build_rewards(suite.scorers)
    except PosttrainError as exc:
        raise PosttrainError(f"eval suite {suite.name!r}: scorers: {exc}") from None
    result = scorer(_inputs(prompts, answers))
    metrics = {}
    for name in scorer.names:
        ok = [v for v in result.components.get(name, []) if v is not None and math.isfinite(v)]
        metrics[name] = sum(ok) / len(ok) if ok else float("nan")
    metrics["unscored"] = sum(t is None for t in result.total) / len(answers)
    tasks = [_task_of(p) for p in prompts]
    for task in sorted({t for t in tasks if t is not None}):
        for name in scorer.names:
            ok = [v for v, t in zip(result.components.get(name, []), tasks)
                  if t == task and v is not None and math.isfinite(v)]
            metrics[f"{name}/{task}"] = sum(ok) / len(ok) if ok else float("nan")
    samples = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        scores = {name: result.components[name][i] for name in scorer.names}
        sample = {"prompt": last_user_text(p.prompt), "reference": p.reference, "completion": a,
                  "score": scores[scorer.names[0]], "scores": scores}
        if tasks[i] is not None:
            sample["task"] = tasks[i]
        samples.append(sample)
    return SuiteResult(metrics, len(answers), scorer.names[0], samples=samples)


def _task_of(prompt) -> str | None:
    """A prompt row's ``task`` field (a string or number), for the per-task breakdown."""
    task = (prompt.metadata or {}).get("task")
    return str(task) if isinstance(task, (str, int)) and not isinstance(task, bool) and str(task) else None


def _win_rate(suite: EvalSuite, prompts: list, answers: list[str]) -> SuiteResult:
    from posttrain.config import ModelConfig
    from posttrain.models.load import load_model, load_tokenizer

    base_cfg = ModelConfig(name_or_path=suite.baseline)
    baseline = load_model(base_cfg)
    base_answers = greedy_answers(baseline, load_tokenizer(base_cfg), prompts, suite)
    del baseline
    if suite.judge is not None:
        from posttrain.rl.rewards import pairwise_judge

        judge = pairwise_judge(suite.judge, f"eval suite {suite.name!r}: judge")
        verdicts = judge.compare_many([(p.prompt, a, b) for p, a, b in zip(prompts, answers, base_answers)])
        outcome = [None if v is None else 1.0 - v for v in verdicts]  # verdict 0: the first (ours) won
    else:
        from posttrain.rl.rewards import RewardModelReward

        rm = RewardModelReward(suite.reward_model, batch_size=suite.batch_size)
        ours, theirs = rm(_inputs(prompts, answers)), rm(_inputs(prompts, base_answers))
        outcome = [None if a is None or b is None else 1.0 if a > b else 0.0 if a < b else 0.5
                   for a, b in zip(ours, theirs)]
    points = [0.5 if o is None else o for o in outcome]
    n = len(points)
    metrics = {"win_rate": sum(points) / n, "wins": sum(o == 1.0 for o in outcome) / n,
               "losses": sum(o == 0.0 for o in outcome) / n, "ties_or_undecided": sum(p == 0.5 for p in points) / n}
    samples = [{"prompt": last_user_text(p.prompt), "reference": b, "completion": a, "score": o}
               for p, a, b, o in zip(prompts, answers, base_answers, outcome)]
    return SuiteResult(metrics, n, "win_rate", samples=samples)


# ---- lm-evaluation-harness ------------------------------------------------------------------------------


def _lm_eval(suite: EvalSuite, model, tokenizer) -> SuiteResult:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        reason = "lm-evaluation-harness is not installed (pip install 'posttrain[lm-eval]')"
        return SuiteResult({}, 0, "", skipped=reason)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite.batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(suite.tasks), num_fewshot=suite.num_fewshot,
                                  limit=suite.limit)
    metrics = {}
    for task, values in (out or {}).get("results", {}).items():
        for key, value in values.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                metrics[f"{task}/{name}"] = float(value)
    if not metrics:
        raise PosttrainError(f"eval suite {suite.name!r}: lm-eval returned no metric for tasks {suite.tasks}")
    return SuiteResult(metrics, int(suite.limit or 0), next(iter(metrics)))


def write_samples(path: Path, samples: list[dict]) -> None:
    import json

    from posttrain.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples))
