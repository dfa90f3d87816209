"""Preference pairs from a policy's own samples, labelled by a known answer (RLHF's step 2 with an oracle).

A reward model trained only on clean synthetic pairs is out of its depth on the answers a policy
actually gives (malformed ones such as "67" or "8 8"), and PPO then learns to produce them. Pairing
the right answer with the policy's own wrong samples, plus any ``distractors``, covers both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def policy_pairs(model_path: str | Path, prompt_rows: list[dict], *, samples: int = 4, max_new_tokens: int = 8,
                 distractors: Callable[[dict], list[str]] | None = None, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "chosen": the answer, "rejected"} for the format "preference".

    For each prompt row ({"prompt", "answer"}), ``samples`` answers are sampled at temperature 1;
    the first wrong one (if any) and every ``distractors(row)`` answer not already used become
    the rejected side of a pair.
    """
    from posttrain.config import ModelConfig
    from posttrain.data.prompts import render_prompt
    from posttrain.generation import stop_token_ids
    from posttrain.generation.base import SamplingParams
    from posttrain.generation.transformers_engine import TransformersEngine
    from posttrain.models.load import load_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(model_path))
    tokenizer = load_tokenizer(mcfg)
    engine = TransformersEngine(load_model(mcfg).eval(), tokenizer, stop_token_ids=stop_token_ids(tokenizer))
    ids = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in prompt_rows]
    params = SamplingParams(max_new_tokens=max_new_tokens, n=samples, seed=seed)
    pairs = []
    for row, sampled in zip(prompt_rows, engine.generate(ids, params)):
        wrong = [s.text for s in sampled if s.text.strip() != row["answer"]][:1]
        wrong += [d for d in (distractors(row) if distractors else []) if d != row["answer"] and d not in wrong]
        pairs += [{"prompt": row["prompt"], "chosen": row["answer"], "rejected": w} for w in wrong]
    return pairs


def digit_distractors(row: dict) -> list[str]:
    """Every single digit: for the task "largest", each is a wrong answer but one."""
    return [str(d) for d in range(10)]
