"""GRPO, PPO and RFT each raise held-out exact-match accuracy on a verifiable task, on CPU.

The task is "What is the largest of 4, 0, 8, 1?" (four distinct digits; the tiny model splits
digits into single tokens). After 80 SFT steps the model answers greedily right on about 73% of
held-out prompts: it says 9 when a 9 is in the list and otherwise mostly 8, even when 8 is not.
Telling whether a digit is present is what the online methods must teach it, from rewards alone.
The start's accuracy is asserted too, so a start that is already good cannot make the tests pass.
"""

import json

import pytest

from tests.conftest import metrics, run

TASK = ("largest",)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from posttrain.data.synthetic import make_prompt_rows, make_task_rows, write_jsonl
    from posttrain.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("largest")
    model = build_tiny_model(root / "tiny", split_digits=True)
    sft_rows = write_jsonl(make_task_rows(2000, seed=1, tasks=TASK), root / "sft.jsonl")
    sft = run({
        "model": {"name_or_path": str(model)}, "method": "sft", "tuning": {"mode": "full"},
        "data": {"train": str(sft_rows), "max_seq_len": 64, "packing": True, "cache_dir": str(root / "cache")},
        "training": {"max_steps": 80, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 20,
                     "logging_steps": 80, "progress_bar": False, "seed": 0},
        "output_dir": str(root / "sft"),
    })
    return {"root": root, "sft": sft,
            "train": write_jsonl(make_prompt_rows(512, seed=5, tasks=TASK), root / "prompts.jsonl"),
            "eval": write_jsonl(make_prompt_rows(256, seed=6, tasks=TASK), root / "prompts_eval.jsonl")}


def online(task, out, method, online_section, **training):
    return {
        "model": {"name_or_path": str(task["sft"])}, "method": method, "tuning": {"mode": "full"},
        "data": {"train": [{"path": str(task["train"]), "format": "prompt"}],
                 "eval": [{"path": str(task["eval"]), "format": "prompt"}],
                 "max_seq_len": 64, "cache_dir": str(task["root"] / "cache")},
        "online": {"generation": {"max_new_tokens": 8, "temperature": 1.0}, **online_section},
        "training": {"batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant", "logging_steps": 5,
                     "progress_bar": False, "seed": 0, **training},
        "output_dir": str(out),
    }


def accuracy(out, key="eval_reward") -> list[float]:
    """Held-out greedy exact-match accuracy at each evaluation, the first one before any update."""
    return [m[key] for m in metrics(out) if key in m]


def assert_learned(acc: list[float]) -> None:
    assert 0.6 < acc[0] < 0.8, f"the SFT start should be partly right; got {acc[0]:.3f}"
    assert acc[-1] >= acc[0] + 0.1, f"held-out accuracy did not rise: {acc}"


def test_grpo_raises_held_out_accuracy(tmp_path, task):
    out = tmp_path / "grpo"
    # Without the KL term and with groups of 8 the policy often collapses onto "9, else 8" before it
    # learns to see which digits are there: every group is then all right or all wrong, and nothing is learnt.
    run(online(task, out, "grpo", {"rewards": [{"type": "exact_match"}], "grpo": {"group_size": 16, "kl_coef": 0.1}},
               max_steps=100, eval_steps=50))
    assert_learned(accuracy(out))


def test_rft_raises_held_out_accuracy(tmp_path, task):
    out = tmp_path / "rft"
    run(online(task, out, "rft", {"rewards": [{"type": "exact_match"}],
                                  "rft": {"rounds": 3, "steps_per_round": 20, "samples_per_prompt": 4,
                                          "threshold": 1.0}},
               max_steps=60, eval_steps=30))
    assert_learned(accuracy(out))
    # Only right answers are kept, and later rounds (from a better policy) keep more of them.
    kept = [json.loads((out / "rounds" / f"round-{r}" / "stats.json").read_text())["kept"] for r in (1, 2, 3)]
    assert kept[-1] > kept[0], kept
    rows = [json.loads(x) for x in (out / "rounds" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert rows and all(r["reward"] == 1.0 for r in rows)


def _pairs_from_policy_samples(sft, prompts_file, out_file):
    """RLHF's step 2 with a labeller that knows the answer: the right answer against every wrong digit and
    against the wrong answers the SFT policy itself gives.

    The policy's own mistakes matter: a reward model trained only on clean pairs is out of its
    depth on malformed samples ("67", "8 8"), and PPO learns to produce them (reward hacking).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.prompts import render_prompt
    from posttrain.data.synthetic import write_jsonl
    from posttrain.data.templates import ChatEncoder
    from posttrain.generation.base import SamplingParams
    from posttrain.generation.transformers_engine import TransformersEngine

    tokenizer = AutoTokenizer.from_pretrained(sft)
    engine = TransformersEngine(AutoModelForCausalLM.from_pretrained(sft), tokenizer,
                                stop_token_ids=[ChatEncoder(tokenizer).end_of_turn_id])
    rows = [json.loads(x) for x in prompts_file.read_text().splitlines()]
    ids = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    pairs = []
    for row, samples in zip(rows, engine.generate(ids, SamplingParams(max_new_tokens=8, n=4, seed=0))):
        wrong = [s.text for s in samples if s.text.strip() != row["answer"]][:1]
        wrong += [str(d) for d in range(10) if str(d) != row["answer"] and str(d) not in wrong]
        pairs += [{"prompt": row["prompt"], "chosen": row["answer"], "rejected": w} for w in wrong]
    return write_jsonl(pairs, out_file)


def test_ppo_with_a_reward_model_trained_here_raises_held_out_accuracy(tmp_path, task):
    from posttrain.data.synthetic import make_prompt_rows, write_jsonl

    rm_prompts = write_jsonl(make_prompt_rows(600, seed=11, tasks=TASK), tmp_path / "rm_prompts.jsonl")
    pairs = _pairs_from_policy_samples(task["sft"], rm_prompts, tmp_path / "pairs.jsonl")
    rm = run({
        "model": {"name_or_path": str(task["sft"])}, "method": "reward", "tuning": {"mode": "full"},
        "data": {"train": [{"path": str(pairs), "format": "preference"}], "max_seq_len": 64,
                 "cache_dir": str(task["root"] / "cache")},
        "training": {"max_steps": 600, "batch_size": 16, "learning_rate": 2e-3, "logging_steps": 100,
                     "progress_bar": False, "seed": 0},
        "output_dir": str(tmp_path / "rm"),
    })
    out = tmp_path / "ppo"
    # The policy learns from the reward model only; exact match rides along with weight 0, to measure.
    # The reward model's scores span about -10..+6: online.ppo.whiten_rewards (default) brings them to
    # the scale the value clip and the KL coefficient assume; without it nothing is learnt here.
    run(online(task, out, "ppo", {"rewards": [{"type": "reward_model", "path": str(rm)},
                                              {"type": "exact_match", "weight": 0.0}],
                                  "ppo": {"samples_per_prompt": 16, "kl_coef": 0.1}},
               max_steps=60, eval_steps=30))
    assert_learned(accuracy(out, "eval_reward/exact_match"))
    evals = [m for m in metrics(out) if "eval_reward/reward_model" in m]
    assert evals[-1]["eval_reward/reward_model"] > evals[0]["eval_reward/reward_model"]
