"""Online methods run the rollout -> reward -> update cycle end to end on the tiny model, on CPU."""

import json
import re

import pytest

from tests.conftest import _merge, base_config, metrics, run


@pytest.fixture(scope="session")
def prompt_data(tmp_path_factory):
    from posttrain.data.synthetic import make_prompt_rows, write_jsonl

    folder = tmp_path_factory.mktemp("prompts")
    return {"train": write_jsonl(make_prompt_rows(64, seed=5), folder / "prompts.jsonl"),
            "eval": write_jsonl(make_prompt_rows(16, seed=6), folder / "prompts_eval.jsonl")}


def online_config(model, data, out, method, **sections):
    raw = base_config(
        model, data["train"], out, method=method,
        data={"train": [{"path": str(data["train"]), "format": "prompt"}],
              "eval": [{"path": str(data["eval"]), "format": "prompt"}], "max_seq_len": 96},
        online={"rewards": [{"type": "exact_match"}], "generation": {"max_new_tokens": 8},
                "grpo": {"group_size": 4}},
        training={"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 3},
    )
    return _merge(raw, sections)


def test_grpo_logs_its_rails_and_saves_samples(tmp_path, sft_model, prompt_data):
    out = tmp_path / "grpo"
    final = run(online_config(sft_model, prompt_data, out, "grpo",
                              online={"grpo": {"kl_coef": 0.05, "epochs": 2}}))
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 3
    for key in ("reward", "reward_std", "entropy", "clip_frac", "masked_frac", "response_length", "kl",
                "logprob_mismatch", "reward/exact_match"):
        assert key in steps[-1], key
    # The engine's log-probs are the ones the trainer recomputes: the same model, the same temperature.
    assert all(m["logprob_mismatch"] < 1e-4 for m in steps)
    assert steps[-1]["masked_frac"] == 0.0
    evals = [m for m in metrics(out) if "eval_reward" in m]
    assert [m["step"] for m in evals] == [0, 3]
    assert evals[0]["eval_loss"] == -evals[0]["eval_reward"]
    rows = [json.loads(x) for x in (out / "samples" / "step-3.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"prompt", "completion", "reward", "reference"} <= set(rows[0])
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["reference"] == "live"
    assert (final / "config.json").is_file()


def test_a_reward_that_raises_masks_samples_and_training_goes_on(tmp_path, sft_model, prompt_data):
    module = tmp_path / "flaky_reward.py"
    module.write_text(
        "def score(prompt, completion, reference, metadata):\n"
        "    if metadata.get('task') == 'add':\n"
        "        raise RuntimeError('cannot score additions')\n"
        "    return float(completion.strip() == reference)\n"
    )
    out = tmp_path / "flaky"
    run(online_config(sft_model, prompt_data, out, "grpo",
                      online={"rewards": [{"type": "python", "function": f"{module}:score"}]}))
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 3
    # One prompt in four is an addition: its samples are masked and counted, and the rest still train.
    assert any(m["masked_frac"] > 0.0 for m in steps) and all(m["masked_frac"] < 1.0 for m in steps)
    assert [m["eval_masked_frac"] for m in metrics(out) if "eval_masked_frac" in m] == [0.25, 0.25]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_rft_writes_each_rounds_kept_samples(tmp_path, sft_model, prompt_data):
    out = tmp_path / "rft"
    run(online_config(sft_model, prompt_data, out, "rft",
                      online={"rewards": [{"type": "length_penalty", "max_chars": 2, "per_unit": 1.0}],
                              "rft": {"rounds": 2, "steps_per_round": 2, "samples_per_prompt": 2}},
                      training={"eval_steps": None}))
    for r in (1, 2):
        rows = [json.loads(x) for x in (out / "rounds" / f"round-{r}" / "kept.jsonl").read_text().splitlines()]
        assert 0 < len(rows) <= 64  # at most the best of 2 for each prompt
        assert rows[0]["messages"][-1]["role"] == "assistant" and "reward" in rows[0]
        stats = json.loads((out / "rounds" / f"round-{r}" / "stats.json").read_text())
        assert stats["kept"] == len(rows) and stats["sampled"] == 128
    assert len([m for m in metrics(out) if "loss" in m]) == 4


def test_rft_kept_rounds_are_valid_sft_data(tmp_path, sft_model, prompt_data):
    from posttrain.data.validate import load_examples

    out = tmp_path / "rft"
    run(online_config(sft_model, prompt_data, out, "rft",
                      online={"rewards": [{"type": "length_penalty", "max_chars": 2}],
                              "rft": {"rounds": 1, "steps_per_round": 1, "samples_per_prompt": 2}},
                      training={"eval_steps": None}))
    examples, report = load_examples(out / "rounds" / "round-1" / "kept.jsonl", "messages")
    assert len(examples) > 0 and report.total_dropped == 0


def test_online_dpo_learns_from_rewards(tmp_path, sft_model, prompt_data):
    out = tmp_path / "odpo"
    run(online_config(sft_model, prompt_data, out, "online_dpo",
                      online={"rewards": [{"type": "length_penalty", "max_chars": 1, "per_unit": 1.0}],
                              "online_dpo": {"samples_per_prompt": 4}}))
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 3 and all(0 < m["pair_frac"] <= 1 for m in steps)
    assert {"rewards/margin", "rewards/accuracy", "reward"} <= set(steps[-1])


def test_online_dpo_takes_pairwise_labels_from_a_judge_server(tmp_path, sft_model, prompt_data):
    from tests.judge_server import serve

    seen = []

    def shorter_wins(request):
        text = request["messages"][-1]["content"]
        seen.append(text)
        a = re.search(r"\[Response A\]\n(.*?)\n\[End of Response A\]", text, re.DOTALL).group(1)
        b = re.search(r"\[Response B\]\n(.*?)\n\[End of Response B\]", text, re.DOTALL).group(1)
        return "A" if len(a) <= len(b) else "B"

    base_url, stop = serve(shorter_wins)
    try:
        out = tmp_path / "judge"
        run(online_config(sft_model, prompt_data, out, "online_dpo",
                          online={"rewards": [], "online_dpo": {"judge": {"base_url": base_url, "model": "judge",
                                                                          "rubric": "Prefer the shorter answer."}}},
                          training={"eval_steps": None}))
    finally:
        stop()
    steps = [m for m in metrics(out) if "loss" in m or "skipped_steps" in m]
    assert seen, "the judge was never asked"
    assert any("rewards/margin" in m for m in steps)
    assert all("judge_undecided_frac" in m for m in steps if "loss" in m)


def test_ppo_with_a_reward_model_trained_here(tmp_path, sft_model, prompt_data, preference_data):
    from tests.conftest import preference_config

    rm = run(preference_config(sft_model, preference_data, tmp_path / "rm", "reward",
                               training={"max_steps": 10, "eval_steps": None}))
    out = tmp_path / "ppo"
    run(online_config(sft_model, prompt_data, out, "ppo",
                      online={"rewards": [{"type": "reward_model", "path": str(rm)}],
                              "ppo": {"epochs": 2, "mini_batches": 2}},
                      training={"max_steps": 2, "save_steps": 1, "eval_steps": 2}))
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 2
    for key in ("reward", "kl", "value_loss", "clip_frac", "entropy", "response_length", "masked_frac"):
        assert key in steps[-1], key
    assert steps[-1]["logprob_mismatch"] < 1e-4 and steps[-1]["masked_frac"] == 0.0
    assert "eval_reward/reward_model" in metrics(out)[-1]
    ckpt = out / "checkpoints" / "step-1"
    assert (ckpt / "value_model" / "config.json").is_file() and (ckpt / "value_optimizer.pt").is_file()
    # Four updates per step (2 epochs x 2 mini-batches): the schedule counts all of them.
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["reference"] == "live"


def test_ppo_resumes_with_its_value_model(tmp_path, sft_model, prompt_data):
    cfg = online_config(sft_model, prompt_data, tmp_path / "ppo", "ppo",
                        online={"rewards": [{"type": "length_penalty", "max_chars": 2}]},
                        training={"max_steps": 2, "save_steps": 1, "eval_steps": None})
    run(cfg)
    cfg["training"]["max_steps"] = 3
    run(cfg, resume=True)
    assert [m["step"] for m in metrics(tmp_path / "ppo") if "loss" in m] == [1, 2, 3]


@pytest.mark.parametrize("method", ["grpo", "online_dpo", "ppo"])
def test_online_methods_raise_a_learnable_reward(tmp_path, sft_model, prompt_data, method):
    """A length reward (-1 per character beyond one) is learnable even by the tiny model: the mean reward rises."""
    out = tmp_path / method
    run(online_config(sft_model, prompt_data, out, method,
                      online={"rewards": [{"type": "length_penalty", "max_chars": 1, "per_unit": 1.0}],
                              "grpo": {"group_size": 8}, "online_dpo": {"samples_per_prompt": 4},
                              "ppo": {"samples_per_prompt": 4, "kl_coef": 0.0}},
                      training={"max_steps": 16, "batch_size": 8, "eval_steps": 16, "logging_steps": 4}))
    steps = [m for m in metrics(out) if "reward" in m]
    assert steps[-1]["reward"] > steps[0]["reward"] + 0.5, [m["reward"] for m in steps]
    assert steps[-1]["response_length"] < steps[0]["response_length"]


def test_judge_settings_are_checked_before_training(tmp_path, sft_model, prompt_data):
    from posttrain.config import load_config
    from posttrain.errors import ConfigError, PosttrainError

    judge = {"base_url": "http://127.0.0.1:9/v1", "model": "judge", "api_key_env": "POSTTRAIN_TEST_UNSET_KEY"}
    cfg = online_config(sft_model, prompt_data, tmp_path / "j", "online_dpo",
                        online={"rewards": [], "online_dpo": {"judge": judge}})
    with pytest.raises(PosttrainError, match=r"online\.online_dpo\.judge: .*POSTTRAIN_TEST_UNSET_KEY is not set"):
        run(cfg)
    cfg["online"]["online_dpo"]["samples_per_prompt"] = 4
    with pytest.raises(ConfigError, match="compares two samples"):
        load_config(None, raw=cfg)


def test_ppo_whitened_rewards_make_the_reward_scale_irrelevant(tmp_path, sft_model, prompt_data):
    """With online.ppo.whiten_rewards a reward x100 trains exactly as the reward itself; without, it does not."""
    def losses_for(per_unit, whiten):
        out = tmp_path / f"ppo-{per_unit}-{whiten}"
        run(online_config(sft_model, prompt_data, out, "ppo",
                          online={"rewards": [{"type": "length_penalty", "max_chars": 1, "per_unit": per_unit}],
                                  "ppo": {"whiten_rewards": whiten}},
                          training={"max_steps": 2, "eval_steps": None}))
        return [m["loss"] for m in metrics(out) if "loss" in m]

    base, scaled = losses_for(1.0, True), losses_for(100.0, True)
    assert base == pytest.approx(scaled, rel=1e-4)
    assert losses_for(100.0, False) != pytest.approx(base, rel=1e-2)


def test_grpo_with_lora_uses_the_adapters_off_reference(tmp_path, sft_model, prompt_data):
    out = tmp_path / "lora"
    final = run(online_config(sft_model, prompt_data, out, "grpo",
                              tuning={"mode": "lora", "lora": {"r": 4}},
                              online={"rewards": [{"type": "length_penalty", "max_chars": 1, "per_unit": 1.0}],
                                      "grpo": {"kl_coef": 0.1, "kl_estimator": "k3"}},
                              training={"max_steps": 2, "eval_steps": None}))
    steps = [m for m in metrics(out) if "loss" in m]
    assert json.loads((out / "run.json").read_text())["reference"] == "adapters_off"
    # LoRA starts as the identity, so before the first update the policy is its reference.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[1]["kl"] > 0.0
    assert (final / "adapter_config.json").is_file()


def test_a_non_finite_online_loss_stops_with_the_last_good_checkpoint(tmp_path, sft_model, prompt_data,
                                                                      monkeypatch):
    import posttrain.trainers.online as online
    from posttrain.trainers.loop import NonFiniteLoss

    real = online.clipped_surrogate
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, clipped = real(*args, **kwargs)
        return (loss * float("nan"), clipped) if calls["n"] > 2 else (loss, clipped)

    monkeypatch.setattr(online, "clipped_surrogate", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="step 3"):
        run(online_config(sft_model, prompt_data, out, "grpo", training={"max_steps": 4, "save_steps": 2,
                                                                          "eval_steps": None}))
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
