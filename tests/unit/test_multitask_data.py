"""Tasks on rows: the multitask format, tasks through tokenization and the cache, replay sources, config checks."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from posttrain.config import load_config
from posttrain.data.collate import collate
from posttrain.data.dataset import UNTASKED, build_datasets, fingerprint, replay_sources
from posttrain.data.formats import normalise
from posttrain.data.mixing import REPLAY_TASK
from posttrain.data.synthetic import make_general_corpus, make_task_rows, write_jsonl
from posttrain.errors import ConfigError, PosttrainError
from tests.conftest import base_config

QUIET = {"log": lambda *a, **k: None}


def norm(row, fmt):
    return normalise(row, fmt, file="f.jsonl", row_no=3)


# ---- formats -------------------------------------------------------------------------------------------


def test_multitask_rows_become_a_user_and_an_assistant_turn_with_their_task():
    ex = norm({"task": "qa", "instruction": "Answer.", "input": "2 + 2?", "output": "4"}, "multitask")
    assert ex.task == "qa"
    assert ex.messages == [{"role": "user", "content": "Answer.\n\n2 + 2?"}, {"role": "assistant", "content": "4"}]
    bare = norm({"task": 7, "input": "hello", "output": "HELLO"}, "multitask")
    assert bare.task == "7" and bare.messages[0] == {"role": "user", "content": "hello"}


def test_multitask_rows_need_a_task_input_and_output():
    found = norm({"instruction": "x"}, "multitask")
    assert sorted((i.field, i.reason) for i in found) == [
        ("input", "missing field"), ("output", "missing field"), ("task", "missing field")]


@pytest.mark.parametrize("fmt,row", [
    ("text", {"text": "some words"}),
    ("alpaca", {"instruction": "say hi", "output": "hi"}),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
])
def test_other_formats_keep_an_optional_task(fmt, row):
    assert norm(row, fmt).task is None
    assert norm({**row, "task": "translate to French"}, fmt).task == "translate to French"
    bad = norm({**row, "task": "a/b"}, fmt)
    assert [(i.field, i.reason) for i in bad] == [("task", "bad task name")]
    assert [(i.field, i.reason) for i in norm({**row, "task": ["x"]}, fmt)] == [("task", "wrong type")]


# ---- tokenized sets ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _build(tiny_model, tmp_path, tok, method="sft", **data):
    raw = base_config(tiny_model, tmp_path / "train.jsonl", tmp_path / "out", method=method, data=data)
    cfg = load_config(None, raw=raw)
    return build_datasets(cfg.data, tok, method, seed=0, **QUIET), cfg


def test_tasks_travel_with_every_sample_and_through_the_cache(tmp_path, tiny_model, tok):
    rows = make_task_rows(30, seed=0, tasks=("add", "upper"))
    rows[0].pop("task")  # a row without a task joins "untasked"
    train = write_jsonl(rows, tmp_path / "rows.jsonl")
    qa = write_jsonl([{"task": "qa", "input": f"q{i}", "output": f"a{i}"} for i in range(10)], tmp_path / "qa.jsonl")
    named = write_jsonl(make_task_rows(6, seed=1, tasks=("count",)), tmp_path / "named.jsonl")
    sources = [str(train), {"path": str(qa), "format": "multitask"}, {"path": str(named), "task": "letters"}]
    (ds, ev, _, fp), _ = _build(tiny_model, tmp_path, tok, train=sources, packing=True)
    assert ev is None
    assert ds.task_names == ["add", "letters", "qa", UNTASKED, "upper"]
    names = [ds.task_names[t] for t in ds.sample_tasks]
    # The source's task overrides the rows' own ("count"); the file order is kept.
    assert names == ["untasked"] + ["upper", "add"] * 14 + ["upper"] + ["qa"] * 10 + ["letters"] * 6
    # Rows come as (ids, labels, task id) samples, and collate puts each position's task in the batch.
    batch = collate([ds.row(r) for r in range(2)], 0)
    assert batch["task_ids"].shape == batch["input_ids"].shape
    for r in range(2):
        at = 0
        for ids, _, task in ds.row(r):
            assert (batch["task_ids"][r, at : at + len(ids)] == task).all()
            at += len(ids)
        assert (batch["task_ids"][r, at:] == -1).all()
    # The cached copy holds the same tasks.
    (again, _, _, fp2), _ = _build(tiny_model, tmp_path, tok, train=sources, packing=True)
    assert fp2 == fp and again.task_names == ds.task_names and again.sample_tasks.tolist() == ds.sample_tasks.tolist()
    # A changed source task is a different data set.
    sources[2] = {"path": str(named), "task": "letters2"}
    (renamed, _, _, fp3), _ = _build(tiny_model, tmp_path, tok, train=sources, packing=True)
    assert fp3 != fp and "letters2" in renamed.task_names


def test_without_tasks_rows_are_plain_pairs(tmp_path, tiny_model, tok):
    train = write_jsonl([{"text": t} for t in make_general_corpus(20, seed=0)], tmp_path / "t.jsonl")
    (ds, _, _, _), _ = _build(tiny_model, tmp_path, tok, method="pretrain", train=[{"path": str(train),
                                                                                   "format": "text"}])
    assert ds.task_names == [] and ds.sample_tasks is None
    assert all(len(s) == 2 for s in ds.row(0))
    assert "task_ids" not in collate([ds.row(0)], 0)


def test_mixing_over_data_without_tasks_is_one_task(tmp_path, tiny_model, tok):
    from posttrain.data.mixing import make_sampler

    train = write_jsonl([{k: v for k, v in r.items() if k != "task"} for r in make_task_rows(24, seed=0)],
                        tmp_path / "plain.jsonl")
    (ds, _, _, _), cfg = _build(tiny_model, tmp_path, tok, train=str(train), mixing={"strategy": "equal"})
    assert ds.task_names == [UNTASKED]
    s = make_sampler(cfg.data, ds.row_tasks(), ds.task_names, 0)
    assert sorted(s.epoch_rows(0)) == list(range(24))


def test_mixing_packs_each_row_from_one_task(tmp_path, tiny_model, tok):
    train = write_jsonl(make_task_rows(60, seed=0, tasks=("add", "upper", "reverse")), tmp_path / "rows.jsonl")
    (mixed, _, _, _), _ = _build(tiny_model, tmp_path, tok, train=str(train), packing=True,
                                 mixing={"strategy": "equal"})
    assert all(len({t for *_, t in mixed.row(r)}) == 1 for r in range(len(mixed)))
    assert mixed.row_tasks() == [mixed.row(r)[0][2] for r in range(len(mixed))]
    (plain, _, _, _), _ = _build(tiny_model, tmp_path, tok, train=str(train), packing=True)
    assert any(len({t for *_, t in plain.row(r)}) > 1 for r in range(len(plain)))  # the check above can fail


def test_replay_rows_join_the_task_replay_and_their_files_are_fingerprinted(tmp_path, tiny_model, tok):
    train = write_jsonl(make_task_rows(20, seed=0, tasks=("add",)), tmp_path / "rows.jsonl")
    old = write_jsonl([{"text": t} for t in make_general_corpus(12, seed=1)], tmp_path / "old.jsonl")
    replay = {"sources": [{"path": str(old), "format": "text"}], "fraction": 0.3}
    (ds, _, report, fp), cfg = _build(tiny_model, tmp_path, tok, train=str(train), replay=replay)
    assert ds.task_names == ["add", REPLAY_TASK]
    assert [ds.task_names[t] for t in ds.sample_tasks].count(REPLAY_TASK) >= 12  # long texts split into pieces
    assert str(old) in report.format()
    assert fingerprint(cfg.data, tok, "sft-0", 0) == fp  # as build_datasets keys it
    write_jsonl([{"text": t} for t in make_general_corpus(12, seed=2)], old)
    assert fingerprint(cfg.data, tok, "sft-0", 0) != fp  # the replay file's bytes changed, nothing else


def test_replay_of_an_earlier_run_reads_its_training_files(tmp_path, tiny_model, tok):
    data = write_jsonl(make_task_rows(8, seed=3, tasks=("upper",)), tmp_path / "run" / "rows.jsonl")
    run = tmp_path / "run"
    (run / "final").mkdir()
    # Paths in the run's config as written there: relative to the run's folder here.
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": [{"path": "rows.jsonl", "weight": 2.0}]}}))
    cfg = load_config(None, raw=base_config(tiny_model, data, tmp_path / "o",
                                            data={"replay": {"sources": str(run / "final"), "fraction": 0.5}}))
    (src,) = replay_sources(cfg.data)
    assert src.path == str(run / "rows.jsonl") and src.weight == 2.0 and src.format == "messages"
    lone = tmp_path / "lone"
    lone.mkdir()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"replay": cfg.data.replay.model_copy(update={"sources": [cfg.data.replay.sources[0].model_copy(
            update={"path": str(lone)})]})})})
    with pytest.raises(PosttrainError, match=r"data.replay.sources\[0\]: .*lone is a folder but not a run"):
        replay_sources(cfg.data)


def test_replay_refusals(tmp_path, tiny_model, tok):
    clash = write_jsonl([{**r, "task": "replay"} for r in make_task_rows(4, seed=0)], tmp_path / "c.jsonl")
    old = write_jsonl(make_task_rows(4, seed=1), tmp_path / "old.jsonl")
    with pytest.raises(PosttrainError, match="task name 'replay' is kept for data.replay"):
        _build(tiny_model, tmp_path, tok, train=str(clash), replay={"sources": str(old), "fraction": 0.2})
    text = write_jsonl([{"text": "a b c"}], tmp_path / "t.jsonl")
    with pytest.raises(PosttrainError, match="replay data file .* format 'messages'.* allowed: text"):
        _build(tiny_model, tmp_path, tok, method="pretrain", train=[{"path": str(text), "format": "text"}],
               replay={"sources": str(old), "fraction": 0.2})


# ---- config -------------------------------------------------------------------------------------------


def _config_error(tiny_model, tmp_path, **sections) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, raw=base_config(tiny_model, tmp_path / "t.jsonl", tmp_path / "o", **sections))
    return str(info.value)


def test_config_refuses_impossible_combinations(tmp_path, tiny_model):
    msg = _config_error(tiny_model, tmp_path, data={"mixing": {"strategy": "temperature"}})
    assert "data.mixing.strategy=temperature needs data.mixing.temperature" in msg
    msg = _config_error(tiny_model, tmp_path, data={"mixing": {"strategy": "equal", "temperature": 2}})
    assert "temperature is used only with strategy=temperature" in msg
    msg = _config_error(tiny_model, tmp_path, data={"train": [{"path": "a.jsonl", "weight": 2}],
                                                    "mixing": {"strategy": "size"}})
    assert "data.train[0].weight=2 with data.mixing" in msg and "drop data.mixing to keep the weights" in msg
    msg = _config_error(tiny_model, tmp_path, data={"replay": {"sources": "a.jsonl", "fraction": 1.0}})
    assert "data.replay.fraction" in msg
    msg = _config_error(tiny_model, tmp_path, data={"replay": {"sources": [{"path": "a", "task": "x"}],
                                                               "fraction": 0.5}})
    assert "task is not used in replay data" in msg
    msg = _config_error(tiny_model, tmp_path, data={"train": [{"path": "a.jsonl", "task": "a/b"}]})
    assert "data.train[0].task" in msg and "task name 'a/b'" in msg
    msg = _config_error(tiny_model, tmp_path, method="dpo", data={"mixing": {"strategy": "equal"}})
    assert "data.mixing: tasks, mixing and replay work on the token rows of methods pretrain and sft" in msg
    msg = _config_error(tiny_model, tmp_path, training={"l2_to_start": -1})
    assert "training.l2_to_start" in msg


def test_a_pipeline_stage_can_replay_an_earlier_stage(tmp_path, tiny_model):
    from posttrain.pipeline import build_pipeline

    pipe = build_pipeline({"output_dir": str(tmp_path / "p"), "defaults": {"model": {"name_or_path": str(tiny_model)}},
                           "stages": [{"name": "a", "method": "pretrain", "data": {"train": "a.jsonl"}},
                                      {"name": "b", "method": "pretrain", "data": {
                                          "train": "b.jsonl", "replay": {"sources": "${a}", "fraction": 0.2}}}]})
    b = pipe.stage("b")
    assert b.config.data.replay.sources[0].path == str(tmp_path / "p" / "a" / "final")
    assert "a" in b.depends_on


def test_generation_suite_accuracy_per_task():
    from posttrain.config import EvalSuite
    from posttrain.data.preference import PromptExample
    from posttrain.eval.suites import _scored

    prompts = [PromptExample("f", i + 1, [{"role": "user", "content": f"q{i}"}], ref, {"task": task})
               for i, (ref, task) in enumerate([("1", "a"), ("2", "a"), ("3", "b"), ("4", "b"), ("5", "b")])]
    answers = ["1", "x", "3", "4", "x"]
    suite = EvalSuite(name="g", type="generation", path="p.jsonl")
    result = _scored(suite, prompts, answers)
    assert result.metrics["exact_match"] == pytest.approx(3 / 5)
    assert result.metrics["exact_match/a"] == pytest.approx(1 / 2)
    assert result.metrics["exact_match/b"] == pytest.approx(2 / 3)
    assert [s["task"] for s in result.samples] == ["a", "a", "b", "b", "b"]


def test_perplexity_suite_per_task_adds_up_to_the_whole(tmp_path, model, tok):
    from posttrain.config import EvalSuite
    from posttrain.eval.suites import run_suite

    rows = [{"text": t, "task": "news" if i % 3 else "chat"} for i, t in enumerate(make_general_corpus(12, seed=0))]
    path = write_jsonl(rows, tmp_path / "ppl.jsonl")
    result = run_suite(EvalSuite(name="p", type="perplexity", path=str(path), batch_size=5), model, tok,
                       max_seq_len=64)
    m = result.metrics
    assert m["tokens"] == m["tokens/chat"] + m["tokens/news"]
    parts = m["loss/chat"] * m["tokens/chat"] + m["loss/news"] * m["tokens/news"]
    assert m["loss"] * m["tokens"] == pytest.approx(parts)
    assert m["loss/chat"] != pytest.approx(m["loss/news"])
    assert json.dumps(m)  # eval.json holds it
