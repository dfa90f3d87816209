"""``posttrain synth self-instruct``: new tasks written by a model, after Self-Instruct (Wang et al. 2022,
"Self-Instruct: Aligning Language Models with Self-Generated Instructions", section 2).

Each round, for ``batch_size`` attempts:

1. a prompt lists ``examples`` instructions, sampled from the seed tasks and (up to ``generated_examples``
   of them) from the tasks kept so far, and asks the model for a new one;
2. the instruction is dropped when it is empty, cut off, shorter than ``min_words`` or longer than
   ``max_words`` words, holds a blocked word, or repeats or resembles a seed or a kept instruction: an
   exact duplicate (normalised words), a near duplicate (word n-gram Jaccard >= ``ngram_overlap``) or a
   ROUGE-L F1 >= ``similarity`` (``similarity.py``; the paper keeps an instruction only below 0.7);
3. the model answers each surviving instruction; an empty (or, unless ``keep_truncated``, cut off)
   answer drops the task, and so does resembling a task kept earlier in the same round;
4. a kept task joins the pool that later instructions are compared with and drawn from.

It stops once ``n`` tasks are kept or ``max_attempts`` instructions were generated; every attempt is
counted once: kept, dropped for one reason, or unused because ``n`` was reached within the round.

Unlike the paper, each sample is one instruction (not the continuation of a numbered list), and there
is no classification-task detection or input-first / output-first instance generation: the answer
is the model's reply to the instruction alone, and ``input`` is left empty.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.overlap import words
from posttrain.data.prompts import last_user_text
from posttrain.data.synthetic.model_based import (
    Sampler,
    Summary,
    check_out,
    load_sampler,
    progress_bar,
    provenance,
    read_prompt_rows,
    response_problem,
    sampling_params,
    source_line,
    write_summary,
)
from posttrain.data.synthetic.settings import SelfInstructSettings
from posttrain.data.synthetic.similarity import NoveltyPool

UNUSED = "unused (--n reached within the round)"
# A reply often labels its task ("Task 9: ...", "Instruction: ...", "9. ...") or goes on listing more after the
# first. A label is "task"/"instruction" with a number or a colon after it, or a number with ".", ")" or ":" and
# a space after it: "Task-based learning: ..." and "2.5 kg of flour ..." are tasks, not labels.
_LABEL = re.compile(
    r"\s*(?:(?:new\s+)?(?:task|instruction)\s*(?:(?P<task>\d+)\s*[:.)-]|:)|(?P<item>\d+)[.):](?=\s|$))\s*", re.IGNORECASE)
_NEXT_TASK = re.compile(r"\n\s*(?:task|instruction)\s*\d+\s*[:.)]", re.IGNORECASE)


def clean_instruction(text: str) -> str:
    """The first task of a reply, without its label or surrounding quotes.

    The reply ends at a line labelled as another task ("Task 10: ..."), or, when its own label is
    number n, at a line numbered n + 1 (a numbered list of tasks); other numbered lines are the task's.
    """
    text = _NEXT_TASK.split(text, maxsplit=1)[0]
    label = _LABEL.match(text)
    if label:
        text = text[label.end():]
        number = label.group("task") or label.group("item")
        if number:
            text = re.split(rf"\n\s*{int(number) + 1}[.):](?=\s|$)", text, maxsplit=1)[0]
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def instruction_prompt(examples: list[str]) -> list[dict]:
    listing = "\n".join(f"Task {i}: {' '.join(text.split())}" for i, text in enumerate(examples, 1))
    return [{"role": "user", "content": f"Here are some tasks:\n{listing}\n\nWrite task {len(examples) + 1}: one new "
                                        "task, unlike every task above. Reply with the task only."}]


def pick_examples(rng: random.Random, seeds: list[str], kept: list[str], settings: SelfInstructSettings) -> list[str]:
    generated = rng.sample(kept, min(settings.generated_examples, len(kept)))
    chosen = rng.sample(seeds, min(settings.examples - len(generated), len(seeds))) + generated
    rng.shuffle(chosen)
    return chosen


def instruction_problem(text: str, generation, settings: SelfInstructSettings) -> str | None:
    """Why an instruction is unusable on its own (the pool decides about repeats), or None."""
    if not text:
        return "empty instruction"
    if generation.finish_reason == "length" and not settings.keep_truncated:
        return "truncated instruction (hit --max-new-tokens)"
    n = len(words(text))
    if n < settings.min_words:
        return f"too short (< {settings.min_words} words)"
    if n > settings.max_words:
        return f"too long (> {settings.max_words} words)"
    padded = f" {' '.join(words(text))} "
    if any(f" {' '.join(words(w))} " in padded for w in settings.blocked_word if words(w)):
        return "blocked word"
    return None


@dataclass
class _Candidate:
    text: str
    attempt: int
    rouge_l: float


def self_instruct(sampler: Sampler, seeds: list[str],
                  settings: SelfInstructSettings) -> tuple[list[dict], Counter, int]:
    """(task rows, dropped attempts per reason, attempts made); see the module docstring."""
    rng = random.Random(settings.seed)
    pool = NoveltyPool(similarity=settings.similarity, ngram_overlap=settings.ngram_overlap, n=settings.ngram)
    for seed in seeds:
        pool.add(seed)
    kept: list[str] = []
    rows: list[dict] = []
    drops: Counter = Counter()
    attempts = 0
    bar = progress_bar(settings.n, "self-instruct", settings.progress, "task")
    while len(rows) < settings.n and attempts < settings.attempts:
        ids = []
        for _ in range(min(settings.batch_size, settings.attempts - attempts)):
            encoded = sampler.encode(instruction_prompt(pick_examples(rng, seeds, kept, settings)),
                                     settings.max_new_tokens)
            if isinstance(encoded, tuple):
                attempts += 1
                drops[f"{encoded[0]} (lower --examples)"] += 1
            else:
                ids.append(encoded)
        candidates = []
        for generations in sampler.generate(ids, sampling_params(settings, rng)):
            attempts += 1
            text = clean_instruction(generations[0].text)
            problem = instruction_problem(text, generations[0], settings)
            verdict = None if problem else pool.check(text)
            if problem or verdict.reason:
                drops[problem or verdict.reason] += 1
            else:
                candidates.append(_Candidate(text, attempts, verdict.rouge_l))
        answers = _answers(sampler, candidates, drops, settings, rng)
        mark = len(pool)  # the candidates were checked against the pool up to here, not against each other
        for candidate, answer in answers:
            if len(rows) == settings.n:
                drops[UNUSED] += 1
                continue
            verdict = pool.check(candidate.text, since=mark)
            problem = response_problem(answer, settings.keep_truncated) or verdict.reason
            if problem:
                drops[problem] += 1
                continue
            pool.add(candidate.text)
            kept.append(candidate.text)
            rows.append(_row(candidate, answer, max(candidate.rouge_l, verdict.rouge_l), sampler, settings))
            bar.update(1)
        bar.set_postfix(attempts=attempts, refresh=False)
    bar.close()
    return rows, drops, attempts


def _answers(sampler: Sampler, candidates: list[_Candidate], drops: Counter, settings: SelfInstructSettings,
             rng: random.Random) -> list[tuple]:
    ready, ids = [], []
    for candidate in candidates:
        encoded = sampler.encode([{"role": "user", "content": candidate.text}], settings.answer_max_new_tokens)
        if isinstance(encoded, tuple):
            drops[f"answer {encoded[0]}"] += 1
        else:
            ready.append(candidate)
            ids.append(encoded)
    params = sampling_params(settings, rng, max_new_tokens=settings.answer_max_new_tokens,
                             temperature=settings.answer_temperature)
    return [(c, gs[0]) for c, gs in zip(ready, sampler.generate(ids, params))]


def _row(candidate: _Candidate, answer, rouge_l: float, sampler: Sampler, settings: SelfInstructSettings) -> dict:
    if settings.format == "alpaca":
        row = {"instruction": candidate.text, "input": "", "output": answer.text}
    else:
        row = {"messages": [{"role": "user", "content": candidate.text},
                            {"role": "assistant", "content": answer.text}]}
    synth = provenance("self-instruct", sampler, settings, attempt=candidate.attempt, rouge_l=round(rouge_l, 4),
                       finish_reason=answer.finish_reason)
    return {**row, "source": source_line("self-instruct", sampler, settings), "synth": synth}


def run_self_instruct(model: str, seeds: str | Path, out: str | Path, settings: SelfInstructSettings,
                      sampler: Sampler | None = None) -> Summary:
    out = check_out(out)
    seed_rows, report = read_prompt_rows(seeds, "seed tasks")
    # An alpaca seed's input (the instance) is not part of its task: pooled, it would lower every similarity.
    texts = list(dict.fromkeys(t for t in (r.instruction or last_user_text(r.prompt).strip() for r in seed_rows) if t))
    sampler = sampler or load_sampler(model, settings)
    rows, drops, attempts = self_instruct(sampler, texts, settings)
    notes = []
    if len(rows) < settings.n:
        notes.append(f"stopped at --max-attempts {settings.attempts}: {len(rows)} of --n {settings.n} tasks kept")
    title = f"synth self-instruct ({len(texts)} seed tasks, {attempts} instructions generated, {len(rows)} kept)"
    return write_summary(Summary(title, out, len(rows), drops, report, notes), rows)
