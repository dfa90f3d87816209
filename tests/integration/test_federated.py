"""Federated LoRA on a real local Flower federation (a SuperLink and one SuperNode per client, each in its own
process): three clients with different slices of the `larger` task improve the global adapter's held-out loss
round after round, the rounds' adapters are normal peft folders, and a file-access audit of every Flower
process shows that each client's files are opened by that client's processes only."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from posttrain.data.synthetic import make_prompt_rows, make_task_rows, write_jsonl

pytest.importorskip("flwr")

# Loaded by every Python process the federation starts (PYTHONPATH): logs each file it opens, one log per pid.
AUDIT = textwrap.dedent("""
    import os, sys
    _folder = os.environ.get("POSTTRAIN_TEST_AUDIT_DIR")
    if _folder:
        _log = open(os.path.join(_folder, f"{os.getpid()}.log"), "a", buffering=1)

        def _hook(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                path = os.fsdecode(args[0])
                _log.write(os.path.realpath(path) + "\\n")

        sys.addaudithook(_hook)
""")


def _larger(row: dict) -> int:
    return int(row["answer"])


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("federated")
    rows = make_task_rows(1000, seed=3, tasks=("larger",))
    # Non-IID: each client sees only the questions whose answer falls in its own range.
    slices = {"low": lambda m: m < 60, "mid": lambda m: 60 <= m < 85, "high": lambda m: m >= 85}
    clients = []
    for name, keep in slices.items():
        mine = [r for r in rows[:900] if keep(_larger(r))]
        clients.append({"name": name, "data": str(write_jsonl(mine[:-16], root / f"{name}.jsonl")),
                        "eval": str(write_jsonl(mine[-16:], root / f"{name}_eval.jsonl"))})
    config = {
        "model": {"name_or_path": str(tiny_model)},
        "tuning": {"mode": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"max_seq_len": 64},
        "training": {"max_steps": 10, "batch_size": 8, "learning_rate": 5e-3, "lr_scheduler": "constant",
                     "logging_steps": 5, "seed": 0},
        "federated": {"rounds": 2},
        "clients": clients,
        "eval": {"suites": [
            {"name": "heldout", "type": "perplexity", "format": "messages",
             "path": str(write_jsonl(rows[900:], root / "heldout.jsonl"))},
            {"name": "answers", "type": "generation", "limit": 16, "max_new_tokens": 4,
             "path": str(write_jsonl(make_prompt_rows(16, seed=9, tasks=("larger",)), root / "prompts.jsonl"))},
        ]},
        "output_dir": str(root / "run"),
    }
    (root / "federated.yaml").write_text(yaml.safe_dump(config))
    audit, site = root / "audit", root / "site"
    audit.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    return {"root": root, "config": root / "federated.yaml", "audit": audit, "site": site, "clients": clients}


@pytest.fixture(scope="module")
def finished(federation):
    from posttrain.federated import load_federated_config, run_federated

    mp = pytest.MonkeyPatch()
    # Only the processes the federation starts are audited: this one started before the hook existed.
    mp.setenv("PYTHONPATH", os.pathsep.join([str(federation["site"]), os.environ.get("PYTHONPATH", "")]))
    mp.setenv("POSTTRAIN_TEST_AUDIT_DIR", str(federation["audit"]))
    try:
        final = run_federated(load_federated_config(federation["config"]), log=lambda *a, **k: None)
    finally:
        mp.undo()
    out = final.parent
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"final": final, "out": out, "metrics": lines}


def test_rounds_improve_the_global_held_out_loss(finished):
    glob = {m["round"]: m for m in finished["metrics"] if m["scope"] == "global"}
    assert sorted(glob) == [0, 1, 2]
    loss = [glob[r]["heldout/loss"] for r in (0, 1, 2)]
    assert loss[2] < loss[1] < loss[0] and loss[0] - loss[2] > 0.3
    assert all("answers/exact_match" in glob[r] for r in (0, 1, 2))  # the generation suite's accuracy is logged
    run = json.loads((finished["out"] / "run.json").read_text())
    assert run["status"] == "completed" and run["rounds"] == 2


def test_every_client_reports_every_round_and_evaluates_the_last_adapter(finished):
    clients = [m for m in finished["metrics"] if m["scope"] == "client"]
    assert not [m for m in clients if "error" in m]
    for r in (1, 2):
        trained = {m["client"]: m for m in clients if m["round"] == r and m["phase"] == "train"}
        assert set(trained) == {"low", "mid", "high"}
        assert all(m["eval_loss_after"] < m["eval_loss_before"] for m in trained.values())
    final_eval = {m["client"]: m["eval_loss"] for m in clients if m["phase"] == "evaluate"}
    assert set(final_eval) == {"low", "mid", "high"}
    # A client's first report scores the untrained start, its last evaluation the final global adapter.
    first = {m["client"]: m["eval_loss_before"] for m in clients if m["round"] == 1 and m["phase"] == "train"}
    assert all(final_eval[c] < first[c] for c in first)


def test_each_rounds_adapter_is_a_normal_adapter_folder(finished, tiny_model):
    from posttrain.config import EvalSuite, ModelConfig
    from posttrain.eval.suites import run_suite
    from posttrain.models.load import load_model, load_tokenizer

    out = finished["out"]
    for folder in (out / "rounds" / "round-1", out / "rounds" / "round-2", finished["final"]):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    last = (out / "rounds" / "round-2" / "adapter_model.safetensors").read_bytes()
    assert (finished["final"] / "adapter_model.safetensors").read_bytes() == last
    # Loaded like any adapter, the final model scores what the server logged for the last round.
    cfg = ModelConfig(name_or_path=str(finished["final"]))
    suite = yaml.safe_load((out / "config.yaml").read_text())["eval"]["suites"][0]
    result = run_suite(EvalSuite(**suite), load_model(cfg, "lora"), load_tokenizer(cfg), max_seq_len=64)
    logged = next(m for m in finished["metrics"] if m["scope"] == "global" and m["round"] == 2)["heldout/loss"]
    assert result.metrics["loss"] == pytest.approx(logged, rel=1e-4)


def test_no_process_opens_another_clients_files(finished, federation):
    out = finished["out"]
    own = {}
    for c in federation["clients"]:
        files = {os.path.realpath(c["data"]), os.path.realpath(c["eval"])}
        own[c["name"]] = (files, os.path.realpath(out / "clients" / c["name"]))
    heldout = os.path.realpath(federation["root"] / "heldout.jsonl")
    readers = {name: 0 for name in own}
    logs = list(federation["audit"].glob("*.log"))
    assert len(logs) >= 1 + 1 + 3 + 3  # the SuperLink, the ServerApp, the SuperNodes and their ClientApps
    for log in logs:
        opened = set(Path(log).read_text().splitlines())
        touched = {name for name, (files, workspace) in own.items()
                   if opened & files or any(p.startswith(workspace + os.sep) for p in opened)}
        assert len(touched) <= 1, f"process {log.stem} opened the files of clients {sorted(touched)}"
        if heldout in opened:  # the ServerApp: it evaluates on its own data and reads no client's
            assert not touched
        for name in touched:
            readers[name] += bool(opened & own[name][0])
    # The audit saw every client's data being read (once per round and once for the final evaluation).
    assert all(n >= 3 for n in readers.values()), readers


def test_a_failing_client_sends_the_server_its_error_type_only(tmp_path, tiny_model, capfd):
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from posttrain.federated import app
    from posttrain.federated.config import parse_federated_config

    secret = tmp_path / "private-site" / "patients.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    spec = tmp_path / "client.yaml"
    spec.write_text(yaml.safe_dump({"name": "a", "data": str(secret), "workspace": str(tmp_path / "ws")}))
    cfg = parse_federated_config({"model": {"name_or_path": str(tiny_model)}, "clients": [{"name": "a"}],
                                  "federated": {"min_clients": 1}, "output_dir": str(tmp_path / "out")})
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(
        {app.RECIPE_KEY: json.dumps(cfg.recipe()), "server-round": 1})})
    context = Context(run_id=1, node_id=1, node_config={"client": str(spec)}, state=RecordDict(), run_config={})
    with pytest.raises(app.ClientFailed) as info:
        # Only the message's content is read before the failure (a real Message needs a running Flower task).
        app.train(SimpleNamespace(content=content), context)
    # What Flower sends the server is str(exception): no file, row or field of the client's.
    said = str(info.value)
    assert said == "DataError in the client's train; see its SuperNode log"
    assert "patients" not in said and "private-site" not in said and "oops" not in said
    assert "patients.jsonl:2 field 'messages'" in capfd.readouterr().err  # the full message stays in its log
