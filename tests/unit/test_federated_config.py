"""The federated config (refusals name the field and the fix), FedProx as the loop's pull to the start, and the
on-device config options (model.quantize, tuning.lora.init_from, memory)."""

import copy

import pytest
import torch
import yaml

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.federated.config import client_run_config, load_federated_config, parse_federated_config

BASE = {
    "model": {"name_or_path": "some/model"},
    "tuning": {"mode": "lora"},
    "training": {"max_steps": 5, "batch_size": 2},
    "federated": {"rounds": 2},
    "clients": [{"name": "a", "data": "a.jsonl", "eval": "a_eval.jsonl", "weight": 2.0},
                {"name": "b", "data": ["b1.jsonl", {"path": "b2.jsonl", "format": "alpaca"}]}],
    "output_dir": "out",
}


def fed(**sections) -> dict:
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def refused(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_federated_config(raw)
    return str(info.value)


def test_a_valid_config_and_its_defaults():
    cfg = parse_federated_config(fed())
    assert cfg.method == "sft" and cfg.federated.strategy == "fedavg" and cfg.federated.fraction == 1.0
    assert [c.name for c in cfg.clients] == ["a", "b"]
    assert [s.path for s in cfg.clients[1].data] == ["b1.jsonl", "b2.jsonl"]
    assert cfg.clients[1].data[1].format == "alpaca" and cfg.clients[0].weight == 2.0
    assert cfg.expected_clients() == 2


def test_what_travels_holds_no_data_path():
    cfg = parse_federated_config(fed(tuning={"mode": "lora", "lora": {"init_from": "start-adapter"}}))
    recipe = cfg.recipe()  # to every client, each round
    assert set(recipe) == {"model", "method", "tuning", "data", "training"}
    assert not {"train", "eval", "replay", "cache_dir"} & set(recipe["data"])
    for key, value in (("replay", {"sources": ["old.jsonl"], "fraction": 0.1}), ("cache_dir", "/srv/cache")):
        assert f"data.{key}: unknown key" in refused(fed(data={key: value}))
    assert "a.jsonl" not in yaml.safe_dump(recipe)
    assert recipe["tuning"]["lora"]["init_from"] is None  # the server's first adapter, sent as weights
    server = cfg.for_server().model_dump(mode="json")  # to the SuperLink, inside the Flower app
    assert [(c["name"], c["weight"], c["data"], c["eval"]) for c in server["clients"]] == [
        ("a", 2.0, [], []), ("b", 1.0, [], [])]
    assert parse_federated_config(server).clients[0].weight == 2.0


@pytest.mark.parametrize("mode", ["full", "freeze", "prompt", "bottleneck"])
def test_non_adapter_or_unaveraged_modes_are_refused(mode):
    msg = refused(fed(tuning={"mode": mode, "freeze": {"train_top_layers": 1}}))
    assert f"tuning.mode={mode}" in msg and "set tuning.mode=lora" in msg


def test_strategy_and_mu_must_agree():
    assert "set federated.strategy=fedprox" in refused(fed(federated={"proximal_mu": 0.1}))
    assert "needs federated.proximal_mu > 0" in refused(fed(federated={"strategy": "fedprox"}))
    cfg = parse_federated_config(fed(federated={"strategy": "fedprox", "proximal_mu": 0.1}))
    assert cfg.federated.proximal_mu == 0.1


def test_clients_are_checked():
    two_a = fed(clients=[{"name": "a", "data": "x.jsonl"}, {"name": "a", "data": "y.jsonl"}])
    assert "repeated: ['a']" in refused(two_a)
    assert "needs at least one client" in refused(fed(clients=[]))
    assert "client name 'a b'" in refused(fed(clients=[{"name": "a b", "data": "x.jsonl"}]))
    with pytest.raises(ConfigError, match=r"clients\[0\] \(a\): no data"):
        parse_federated_config(fed(clients=[{"name": "a"}])).require_client_data()
    assert "more than the 2 clients" in refused(fed(federated={"min_clients": 3}))


def test_a_remote_superlink_needs_tls_or_an_explicit_insecure():
    assert "root_certificates" in refused(fed(federated={"superlink": "10.0.0.1:9091"}))
    cfg = parse_federated_config(fed(clients=[], federated={"superlink": "10.0.0.1:9091", "insecure": True,
                                                              "min_clients": 4}))
    assert cfg.expected_clients() == 4


def test_unknown_keys_and_round_checkpoints_are_refused():
    assert "federated.roundz: unknown key" in refused(fed(federated={"roundz": 3}))
    assert "training.save_steps" in refused(fed(training={"save_steps": 2}))
    assert "data.max_seq_len" in refused(fed(data={"max_seq_len": 2}))


def test_paths_become_absolute_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(fed(model={"name_or_path": "model"})))
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_federated_config(path, ["federated.rounds=4"])
    assert cfg.federated.rounds == 4
    assert cfg.clients[0].data[0].path == str(tmp_path / "a.jsonl")
    assert cfg.model.name_or_path == str(tmp_path / "model")
    assert cfg.output_dir == str(tmp_path.parent / "out")


def test_a_clients_stage_config_trains_on_its_own_files_only(tmp_path):
    cfg = parse_federated_config(fed())
    run = client_run_config(cfg.recipe(), cfg.clients[0], tmp_path / "ws", tmp_path / "ws" / "r1", seed=7)
    assert [s.path for s in run.data.train] == ["a.jsonl"] and [s.path for s in run.data.eval] == ["a_eval.jsonl"]
    assert run.data.cache_dir == str(tmp_path / "ws" / "cache") and run.training.seed == 7
    assert run.tuning.mode == "lora" and run.output_dir == str(tmp_path / "ws" / "r1")


def test_fedprox_is_the_loops_pull_to_the_received_global_adapter(tmp_path):
    from posttrain.federated.local import _round_config
    from posttrain.losses.l2sp import l2_to_start

    # h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2 (Li et al. 2020, eq. 2): training.l2_to_start with coef mu.
    w, w_t = [torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])], [torch.zeros(1, 2), torch.zeros(1)]
    assert l2_to_start(w, w_t, 0.2).item() == pytest.approx(0.1 * (1 + 4 + 0.25))
    cfg = parse_federated_config(fed(federated={"strategy": "fedprox", "proximal_mu": 0.2}))
    plain, round_cfg = _round_config(cfg.recipe(), cfg.clients[0], tmp_path, "round-3", 3, proximal_mu=0.2)
    assert round_cfg.training.l2_to_start == 0.2 and plain.training.l2_to_start == 0.0
    assert round_cfg.training.seed == cfg.training.seed + 3
    msg = refused(fed(training={"l2_to_start": 0.1}))
    assert "training.l2_to_start" in msg and "federated.strategy=fedprox" in msg


def test_the_recipe_passes_the_stage_configs_own_checks():
    msg = refused(fed(model={"name_or_path": "m", "quantize": "int8"}, tuning={"mode": "ia3"}))
    assert "the recipe every client trains with" in msg and "model.quantize=int8" in msg
    assert "model.quantize=int4 cannot train" in refused(fed(model={"name_or_path": "m", "quantize": "int4"}))


def test_init_from_is_made_absolute_and_must_exist(tmp_path, monkeypatch):
    (tmp_path / "start").mkdir()
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(fed(tuning={"mode": "lora", "lora": {"init_from": "start"}})))
    monkeypatch.chdir(tmp_path.parent)
    assert load_federated_config(path).tuning.lora.init_from == str(tmp_path / "start")
    with pytest.raises(ConfigError, match="tuning.lora.init_from='gone': no such adapter folder"):
        load_federated_config(path, ["tuning.lora.init_from=gone"])


STAGE = {"model": {"name_or_path": "some/model"}, "method": "sft", "tuning": {"mode": "lora"},
         "data": {"train": "t.jsonl"}, "output_dir": "out"}


def stage_refused(**changes) -> str:
    raw = copy.deepcopy(STAGE)
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(ConfigError) as info:
        load_config(None, raw=raw)
    return str(info.value)


def test_device_options_are_validated():
    assert "model.quantize=int8 quantizes a frozen base under LoRA" in stage_refused(
        model={"quantize": "int8"}, tuning={"mode": "full"})
    assert "tuning.lora.init_from starts a LoRA adapter" in stage_refused(
        tuning={"mode": "ia3", "lora": {"init_from": "v1"}})
    assert "memory.budget_mb" in stage_refused(memory={"budget_mb": 0})
    assert "memory.over_budget" in stage_refused(memory={"over_budget": "maybe"})
    cfg = load_config(None, raw={**STAGE, "model": {"name_or_path": "m", "quantize": "int8"},
                                 "memory": {"budget_mb": 900, "over_budget": "warn"}})
    assert cfg.model.quantize == "int8" and cfg.memory.budget_mb == 900


def test_without_flower_the_command_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    from posttrain.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(fed()))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["federated", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'posttrain[federated]'" in err and "Traceback" not in err
    # output_dir "out" resolves against the working directory, not the config's folder.
    assert not (tmp_path / "out").exists() and not (tmp_path / "cwd" / "out").exists()


def test_the_package_imports_flower_only_where_it_runs():
    import subprocess
    import sys

    code = "import sys, posttrain.federated, posttrain.cli; assert 'flwr' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_memory_budget_hook_warns_once_or_stops():
    from posttrain.config import MemoryConfig
    from posttrain.ondevice.memory import (
        MemoryBudget,
        MemoryBudgetExceeded,
        memory_report,
        peak_rss_mb,
    )

    said = []
    warn = MemoryBudget(MemoryConfig(budget_mb=1, over_budget="warn"), log=said.append)
    assert warn(1) == {} and warn(2) == {}
    assert len(said) == 1 and "over memory.budget_mb=1 at step 1" in said[0]
    with pytest.raises(MemoryBudgetExceeded, match="at step 3; the run stopped"):
        MemoryBudget(MemoryConfig(budget_mb=1))(3)
    assert MemoryBudget(MemoryConfig(budget_mb=10**7))(1) == {}
    report = memory_report(MemoryConfig(budget_mb=10**7))
    assert report["within_memory_budget"] is True and 0 < report["peak_rss_mb"] <= peak_rss_mb() + 1
    assert set(memory_report(MemoryConfig())) == {"peak_rss_mb"}


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="VmHWM is Linux's")
def test_the_peak_is_the_processs_own_not_its_parents():
    import subprocess
    import sys

    # ru_maxrss is kept across fork and exec: a small child of this 400 MiB process would report 400 MiB or more.
    ballast = bytearray(400 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])
    code = "from posttrain.ondevice.memory import peak_rss_mb; print(peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert float(done.stdout) < 300
    del ballast
