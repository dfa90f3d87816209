"""A client's round without Flower: it learns from the global adapter on its own data, FedProx keeps it near
the global weights, and the final-round evaluation scores the adapter it is given."""

import pytest
import torch

from posttrain.data.synthetic import make_task_rows, write_jsonl
from posttrain.federated.config import ClientSpec, parse_federated_config
from posttrain.federated.local import adapter_model, local_eval, local_round
from posttrain.tuning.weights import adapter_state


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("fedlocal")
    rows = make_task_rows(300, seed=4, tasks=("larger",))
    spec = ClientSpec(name="a", data=[str(write_jsonl(rows[:260], root / "a.jsonl"))],
                      eval=[str(write_jsonl(rows[260:], root / "a_eval.jsonl"))])
    cfg = parse_federated_config({
        "model": {"name_or_path": str(tiny_model)}, "tuning": {"mode": "lora", "lora": {"dropout": 0.0}},
        "data": {"max_seq_len": 64},
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3, "lr_scheduler": "constant",
                     "logging_steps": 4, "seed": 0},
        "clients": [spec.model_dump()], "output_dir": str(root / "out"),
    })
    torch.manual_seed(0)
    start = adapter_state(adapter_model(cfg))
    return {"recipe": cfg.recipe(), "spec": spec, "root": root, "start": start}


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_a_round_learns_on_the_clients_data_and_fedprox_stays_closer(client):
    def quiet(*a, **k):
        pass

    state, report = local_round(client["recipe"], client["spec"], client["root"] / "ws", 1, client["start"],
                                log=quiet)
    assert set(state) == set(client["start"]) and report["client"] == "a" and report["steps"] == 12
    assert report["examples"] == 260
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.1
    prox_state, prox_report = local_round(client["recipe"], client["spec"], client["root"] / "ws", 1,
                                          client["start"], proximal_mu=50.0, log=quiet)
    assert _distance(prox_state, client["start"]) < 0.8 * _distance(state, client["start"])
    assert prox_report["eval_loss_after"] < prox_report["eval_loss_before"]
    # The client's final-round evaluation scores exactly the adapter it is sent.
    again = local_eval(client["recipe"], client["spec"], client["root"] / "ws", client["start"], log=quiet)
    assert again["eval_loss"] == pytest.approx(report["eval_loss_before"], rel=1e-5)
    assert again["eval_examples"] == 40
    # Its tokenized data stays in its own workspace.
    assert any((client["root"] / "ws" / "cache").iterdir())


def test_an_adapter_of_another_shape_is_refused(client):
    from posttrain.errors import PosttrainError

    wrong = {k: v[..., :1] if "lora_A" in k else v for k, v in client["start"].items()}
    with pytest.raises(PosttrainError, match="does not fit this model's adapter"):
        local_round(client["recipe"], client["spec"], client["root"] / "ws", 1, wrong, log=lambda *a, **k: None)
