"""The Flower apps: ``server_app`` (rounds, aggregation, global eval) and ``client_app`` (a client's rounds).

Flower runs them in its own processes: the SuperLink starts the ServerApp, each SuperNode starts a ClientApp
process per message. The server sends the global adapter and the recipe (``FederatedConfig.recipe``); a
client reads its own data through the spec file its SuperNode was given (``--node-config client=SPEC.yaml``)
and answers with its adapter, its example count and a report. Raw data and data paths never travel.
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from posttrain.errors import PosttrainError
from posttrain.federated.config import CONFIG_KEY, ClientSpec, dump_yaml, load_client_spec, parse_federated_config
from posttrain.io import atomic_write_text

RECIPE_KEY = "posttrain-recipe"  # the message config entry holding the recipe (JSON)
WEIGHT_KEY = "aggregation-weight"  # the reply metric FedAvg weighs by: client weight x examples

client_app = ClientApp()
server_app = ServerApp()


# ---- client ---------------------------------------------------------------------------------------------


def _client(context: Context) -> tuple[ClientSpec, Path]:
    path = context.node_config.get("client")
    if not path:
        raise PosttrainError("this SuperNode has no client spec: start it with "
                             "--node-config 'client=\"/path/to/client.yaml\"' (docs/federated.md)")
    spec = load_client_spec(path)
    default = Path.home() / ".cache" / "posttrain" / "federated" / spec.name
    workspace = Path(spec.workspace) if spec.workspace else default
    return spec, workspace


def _report(report: dict) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in report.items() if v is not None})


class ClientFailed(PosttrainError):
    """What the server learns of a client's failure: the exception's type, never its message."""


def _private(phase: str, work):
    """Run a client's ``work``; a failure is logged here in full and reaches the server cleaned.

    Flower sends ``str(exception)`` to the server as the reply's error reason, which the server logs to
    metrics.jsonl, and our errors name the client's files, rows and fields.
    """
    try:
        return work()
    except BaseException as exc:
        traceback.print_exc(file=sys.stderr)
        raise ClientFailed(f"{type(exc).__name__} in the client's {phase}; see its SuperNode log") from None


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    def work():
        from posttrain.federated.local import local_round

        spec, workspace = _client(context)
        config = msg.content["config"]
        return local_round(
            json.loads(config[RECIPE_KEY]), spec, workspace, int(config["server-round"]),
            msg.content["arrays"].to_torch_state_dict(), float(config.get("proximal-mu", 0.0)),
        )

    state, report = _private("train", work)
    content = RecordDict({"arrays": ArrayRecord(OrderedDict(state)),
                          "metrics": MetricRecord({"num-examples": report["examples"]}),
                          "report": _report(report)})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def work():
        from posttrain.federated.local import local_eval

        spec, workspace = _client(context)
        config = msg.content["config"]
        return local_eval(json.loads(config[RECIPE_KEY]), spec, workspace,
                          msg.content["arrays"].to_torch_state_dict())

    report = _private("evaluate", work)
    content = RecordDict({"metrics": MetricRecord({"num-examples": report["eval_examples"]}),
                          "report": _report(report)})
    return Message(content=content, reply_to=msg)


# ---- server ---------------------------------------------------------------------------------------------


class _Tracked:
    """Logs every reply, weighs each by its client's weight, and asks the clients to evaluate after the last round.

    A client evaluates the global adapter it receives before training on it (its report's
    ``eval_loss_before``), so an evaluate message is only needed for the last round's adapter.
    """

    def __init__(self, *, server, rounds: int, **kw):
        super().__init__(**kw)
        self.server = server
        self.rounds = rounds
        self.sent: dict[tuple[str, int], set[int]] = {}  # the nodes each (phase, round) was sent to

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent[("train", server_round)] = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        if server_round < self.rounds:
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent[("evaluate", server_round)] = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round, self._weigh(server_round, list(replies), "train"))

    def aggregate_evaluate(self, server_round, replies):
        # The clients' last evaluation is a report only: without it the final adapter is still saved.
        try:
            replies = self._weigh(server_round, list(replies), "evaluate")
        except PosttrainError as exc:
            self.server.log(f"warning: {exc}")
            return None
        return super().aggregate_evaluate(server_round, replies)

    def _weigh(self, server_round: int, replies: list[Message], phase: str) -> list[Message]:
        sent = self.sent.get((phase, server_round), set())
        if not sent and not replies:  # a round without this phase (evaluation before the last round)
            return replies
        failed = [m for m in replies if m.has_error()]
        for m in failed:
            self.server.client_error(server_round, phase, m.metadata.src_node_id, m.error.reason)
        missing = sorted(sent - {m.metadata.src_node_id for m in replies})
        for node in missing:
            self.server.client_error(server_round, phase, node, "no reply within federated.round_timeout_s")
        if len(failed) == len(replies):
            raise PosttrainError(
                f"round {server_round}: no client succeeded ({phase}): {len(failed)} failed, {len(missing)} did not "
                f"reply within federated.round_timeout_s; see metrics.jsonl and the SuperNode logs"
            )
        for m in replies:
            if m.has_error():
                continue
            report = dict(m.content["report"])
            self.server.client_report(server_round, phase, report)
            metrics = m.content["metrics"]
            metrics[WEIGHT_KEY] = self.server.client_weight(report.get("client")) * max(float(metrics["num-examples"]),
                                                                                       1.0)
        return replies


class TrackedFedAvg(_Tracked, FedAvg):
    pass


class TrackedFedProx(_Tracked, FedProx):
    pass


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from posttrain.federated.runner import update_run_json

    cfg = parse_federated_config(yaml.safe_load(context.run_config[CONFIG_KEY]), "the run's federated config")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "run.json").is_file():  # on a remote SuperLink's machine: `posttrain federated` ran elsewhere
        atomic_write_text(out / "config.yaml", dump_yaml(cfg.model_dump(mode="json")))
        update_run_json(out, status="running", method=f"federated-{cfg.federated.strategy}",
                        seed=cfg.training.seed, rounds=cfg.federated.rounds,
                        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        run_server(grid, cfg)
    except BaseException as exc:
        update_run_json(Path(cfg.output_dir), status="failed", error=str(exc) or type(exc).__name__)
        raise


def run_server(grid: Grid, cfg) -> Path:
    from posttrain.federated.server import GlobalAdapter

    fed = cfg.federated
    server = GlobalAdapter(cfg, log=lambda msg: print(msg, flush=True))
    random.seed(cfg.training.seed)  # Flower draws each round's clients with the random module
    if fed.strategy == "fedprox":
        kind, extra = TrackedFedProx, {"proximal_mu": fed.proximal_mu}
    else:
        kind, extra = TrackedFedAvg, {}
    strategy = kind(server=server, rounds=fed.rounds, fraction_train=fed.fraction, fraction_evaluate=1.0,
                    min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=cfg.expected_clients(),
                    weighted_by_key=WEIGHT_KEY, **extra)
    recipe = json.dumps(cfg.recipe(), separators=(",", ":"))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = server.on_round(server_round, arrays.to_torch_state_dict())
        return MetricRecord(metrics) if metrics else None

    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(OrderedDict(server.initial_state())), num_rounds=fed.rounds,
        timeout=fed.round_timeout_s, train_config=ConfigRecord({RECIPE_KEY: recipe}),
        evaluate_config=ConfigRecord({RECIPE_KEY: recipe}), evaluate_fn=evaluate_global,
    )
    return server.finish(result.arrays.to_torch_state_dict(), fed.rounds)
