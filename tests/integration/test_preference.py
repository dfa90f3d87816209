"""The preference methods learn on the tiny model, on CPU, with fixed seeds.

Every stage starts from the same briefly SFT-trained model and is evaluated on held-out
pairs whose chosen answer is right and rejected answer a near miss (prompts unseen in training).
"""

import json

import pytest
import torch

from tests.conftest import metrics, preference_config, run


def evals(run_dir):
    return [m for m in metrics(run_dir) if "eval_loss" in m]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_reference_methods_raise_heldout_margin_and_accuracy(tmp_path, sft_model, preference_data, method):
    out = tmp_path / method
    run(preference_config(sft_model, preference_data, out, method))
    first, last = evals(out)[0], evals(out)[-1]
    # Policy = reference at the start: every implicit reward is 0.
    assert first["eval_rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["eval_loss"] == pytest.approx(0.6931472 if method == "dpo" else 0.5, abs=1e-5)
    assert last["eval_rewards/margin"] > 0.1, last
    assert last["eval_rewards/accuracy"] > 0.58, last
    assert last["eval_loss"] < first["eval_loss"] - 0.02
    if method == "kto":
        assert "eval_kl" in last and last["eval_kl"] >= 0.0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["reference"] == "precomputed"


@pytest.mark.parametrize(("method", "extra"), [("simpo", {}), ("orpo", {"preference": {"orpo": {"lam": 1.0}}})])
def test_reference_free_methods_raise_heldout_margin(tmp_path, sft_model, preference_data, method, extra):
    out = tmp_path / method
    run(preference_config(sft_model, preference_data, out, method, **extra))
    first, last = evals(out)[0], evals(out)[-1]
    assert last["eval_rewards/margin"] > first["eval_rewards/margin"] + 0.1, (first, last)
    assert last["eval_rewards/accuracy"] >= first["eval_rewards/accuracy"], (first, last)
    assert last["eval_loss"] < first["eval_loss"]
    assert json.loads((out / "run.json").read_text())["reference"] is None


def test_reward_model_ranks_heldout_pairs_and_loads_as_a_classifier(tmp_path, sft_model, preference_data, capsys):
    from transformers import AutoModelForSequenceClassification

    from posttrain.eval.reward_score import score_file

    out = tmp_path / "rm"
    final = run(preference_config(sft_model, preference_data, out, "reward", training={"learning_rate": 1e-3}))
    first, last = evals(out)[0], evals(out)[-1]
    assert last["eval_rewards/accuracy"] >= 0.7, last  # chance is 0.5
    assert last["eval_loss"] < first["eval_loss"] - 0.05, (first, last)
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    # `posttrain score` reads the saved model and scores exactly as evaluation did.
    summary = score_file(final, preference_data["eval"], tmp_path / "scored.jsonl", log=lambda *a: None)
    assert summary.pairs == 80
    assert summary.pair_accuracy == pytest.approx(last["eval_rewards/accuracy"], abs=1e-9)
    rows = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert all(isinstance(r["reward_chosen"], float) and "prompt" in r for r in rows)

    from posttrain.cli import main

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "What is 2 + 2?", "completion": "4"}\n{"prompt": "x"}\n'
                     '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                     '{"prompt": "q", "chosen": "a", "rejected": "b", "score": {"chosen": 9, "rejected": 2}}\n'
                     + json.dumps({"prompt": "long " * 1200, "completion": "x"}) + "\n")
    assert main(["score", str(final), str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "scored 3 rows" in out and "mixed.jsonl:2 field 'completion': missing field" in out
    assert "mixed.jsonl:5: too long" in out
    scored = [json.loads(x) for x in (tmp_path / "mixed.scored.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in scored] == [["completion", "prompt", "reward"], ["messages", "reward"],
                                           ["chosen", "prompt", "rejected", "reward_chosen", "reward_rejected", "score"]]
    assert scored[2]["score"] == {"chosen": 9, "rejected": 2}  # the data's own scores are kept


def test_reward_margin_from_score_changes_the_loss(tmp_path, sft_model, preference_data):
    rows = [json.loads(x) for x in preference_data["train"].read_text().splitlines()]
    scored = tmp_path / "scored_pairs.jsonl"
    scored.write_text("".join(json.dumps({**r, "score": {"chosen": 5.0, "rejected": 1.0}}) + "\n" for r in rows))
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"rm-{flag}"
        cfg = preference_config(sft_model, preference_data, out, "reward",
                                data={"train": [{"path": str(scored), "format": "preference"}]},
                                training={"max_steps": 2, "eval_steps": None},
                                preference={"reward": {"margin_from_score": flag}})
        run(cfg)
        losses[flag] = metrics(out)[0]["loss"]
    # -log σ(Δr - 4) > -log σ(Δr) for every pair, so the margin raises the loss.
    assert losses[True] > losses[False] + 1.0


@pytest.mark.parametrize("mode", ["lora", "freeze", "bitfit"])
def test_dpo_with_each_tuning_mode(tmp_path, sft_model, tiny_model_with_biases, preference_data, mode):
    tuning = {"mode": mode}
    model = sft_model
    if mode == "freeze":
        # In a model this small the tied embeddings carry most of what DPO changes.
        tuning["freeze"] = {"train_top_layers": 1, "train_lm_head": True}
    if mode == "bitfit":
        model = tiny_model_with_biases
    if mode == "lora":
        tuning["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    out = tmp_path / mode
    final = run(preference_config(model, preference_data, out, "dpo", tuning=tuning,
                                  training={"max_steps": 30, "learning_rate": 5e-3 if mode != "full" else 2e-3}))
    last = evals(out)[-1]
    assert last["eval_rewards/margin"] > 0.02, last
    info = json.loads((out / "run.json").read_text())
    assert info["reference"] == ("adapters_off" if mode == "lora" else "precomputed")
    assert (final / ("adapter_config.json" if mode == "lora" else "config.json")).is_file()


def test_precomputed_reference_is_cached_and_reused(tmp_path, sft_model, tiny_model, preference_data):
    logs = []
    for i, model in enumerate([sft_model, sft_model, tiny_model]):
        cfg = preference_config(model, preference_data, tmp_path / f"run{i}", "dpo",
                                training={"max_steps": 2, "eval_steps": None})
        cfg["data"]["cache_dir"] = str(tmp_path / "cache")
        from posttrain.config import load_config
        from posttrain.trainers.stage import run_stage

        run_stage(load_config(None, raw=cfg), log=logs.append)
    # The second run reuses the first one's; other weights (the third run) are scored anew.
    assert sum(str(x).startswith("reference log-probs computed once") for x in logs) == 2
    assert sum(str(x).startswith("reference log-probs loaded from cache") for x in logs) == 1
    assert len(list((tmp_path / "cache").rglob("reference-*.npz"))) == 2


def test_kto_refuses_one_sided_feedback(tmp_path, sft_model, preference_data):
    from posttrain.errors import PosttrainError

    rows = [json.loads(x) for x in preference_data["feedback"].read_text().splitlines()]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({**r, "label": True}) + "\n" for r in rows))
    cfg = preference_config(sft_model, preference_data, tmp_path / "kto", "kto",
                            data={"train": [{"path": str(good), "format": "feedback"}]})
    with pytest.raises(PosttrainError, match="both desirable and undesirable"):
        run(cfg)


def test_kto_trains_on_preference_pairs(tmp_path, sft_model, preference_data):
    """KTO takes pairs too, each giving one desirable and one undesirable example."""
    out = tmp_path / "kto-pairs"
    cfg = preference_config(sft_model, preference_data, out, "kto",
                            data={"train": [{"path": str(preference_data["train"]), "format": "preference"}]},
                            training={"max_steps": 30})
    run(cfg)
    assert evals(out)[-1]["eval_rewards/margin"] > 0.05


def test_unsuitable_data_format_is_refused(tmp_path, sft_model, preference_data, task_data):
    from posttrain.errors import PosttrainError

    cfg = preference_config(sft_model, preference_data, tmp_path / "x", "dpo",
                            data={"train": [{"path": str(task_data["train"]), "format": "messages"}]})
    with pytest.raises(PosttrainError, match="format 'messages', which method 'dpo' does not take"):
        run(cfg)


def test_reference_option_must_fit_method_and_mode(tmp_path, sft_model, preference_data):
    from posttrain.config import load_config
    from posttrain.errors import ConfigError

    cfg = preference_config(sft_model, preference_data, tmp_path / "x", "simpo", preference={"reference": "live"})
    with pytest.raises(ConfigError, match="uses no reference model"):
        load_config(None, raw=cfg)
    cfg = preference_config(sft_model, preference_data, tmp_path / "x", "dpo", preference={"reference": "adapters_off"})
    with pytest.raises(ConfigError, match="needs tuning.mode=lora"):
        load_config(None, raw=cfg)


def test_bad_preference_rows_are_reported_with_file_and_row(tmp_path, sft_model, preference_data):
    from posttrain.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n"
        + json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}) + "\n"
        + json.dumps({"chosen": "a", "rejected": "b"}) + "\n"
    )
    cfg = preference_config(sft_model, preference_data, tmp_path / "x", "dpo",
                            data={"train": [{"path": str(bad), "format": "preference"}]})
    with pytest.raises(DataError) as err:
        run(cfg)
    text = str(err.value)
    assert f"{bad}:1 field 'rejected': identical chosen and rejected" in text
    assert f"{bad}:2 field 'chosen': empty response" in text
    assert f"{bad}:3 field 'prompt': missing field" in text


def test_over_long_pairs_are_dropped_and_counted(tmp_path, sft_model, preference_data):
    rows = [json.loads(x) for x in preference_data["train"].read_text().splitlines()]
    rows[0]["chosen"] = "word " * 200
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "x"
    run(preference_config(sft_model, preference_data, out, "dpo",
                          data={"train": [{"path": str(path), "format": "preference"}]},
                          training={"max_steps": 1, "eval_steps": None}))
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped"] == {"too long": 1}
    assert report["notes"]["reject_reason: wrong answer"] == 399 + 80  # kept train and eval pairs
    assert torch.isfinite(torch.tensor(metrics(out)[0]["loss"]))


def test_nll_term_adds_the_chosen_per_token_nll(tmp_path, sft_model, preference_data):
    """RPO: the first step's loss (policy = reference) is log 2 + weight x the chosen answers' per-token NLL."""
    import math

    out = tmp_path / "rpo"
    run(preference_config(sft_model, preference_data, out, "dpo", preference={"dpo": {"nll_weight": 0.5}},
                          training={"max_steps": 1, "eval_steps": None, "logging_steps": 1}))
    first = metrics(out)[0]
    assert first["nll"] > 0.1
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll"], rel=1e-5)
