"""The federated run's config: the shared training recipe, the clients, the rounds and the global evaluation.

The recipe sections (``model``, ``method``, ``tuning``, ``data`` settings, ``training``) are the stage config's
own, so a client's local training is an ordinary stage run of ``training.max_steps`` (or ``epochs``) on its data.
A client is described by a ``ClientSpec`` (name, data, local eval data, weight, workspace); in a real deployment
each site writes its own spec file and hands it to its SuperNode, so no data path ever leaves the site.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from posttrain.config import (
    DataConfig,
    DataSource,
    EvalConfig,
    ModelConfig,
    Name,
    RunConfig,
    TrainingConfig,
    TuningConfig,
    _format_errors,
    _Section,
    apply_overrides,
    read_yaml,
)
from posttrain.errors import ConfigError

# Modes whose trainable weights are a small peft state dict: what the clients send and the server averages.
FEDERATED_MODES = ("lora", "qlora", "ia3")
FEDERATED_METHODS = ("sft", "pretrain")
CONFIG_KEY = "posttrain-config"  # the Flower app's run config entry holding the federated config (YAML)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# The data section of the stage config without anything naming a file or folder: the recipe travels to every
# client, and each trains on its own files, in its own workspace's cache.
_CLIENT_SIDE = ("train", "eval", "replay", "cache_dir")
DataSettings = create_model(
    "DataSettings", __base__=_Section,
    **{k: (f.annotation, f) for k, f in DataConfig.model_fields.items() if k not in _CLIENT_SIDE},
)


def _sources(v: Any) -> Any:
    if isinstance(v, (str, dict)):
        v = [v]
    if isinstance(v, list):
        return [{"path": s} if isinstance(s, str) else s for s in v]
    return v


class ClientSpec(_Section):
    """One client: what its SuperNode is given (``--node-config client=SPEC.yaml``), never sent anywhere."""

    name: str = Field(description="unique name of the client; the key of its per-client metrics")
    data: list[DataSource] = Field(
        default_factory=list, description="the client's private training files (required in its own spec file and "
        "in a local federation; a remote server's list needs only names and weights)"
    )
    eval: list[DataSource] = Field(
        default_factory=list, description="the client's private held-out files (else data.eval_fraction of data)"
    )
    weight: float = Field(1.0, gt=0, description="multiplies the client's example count in the weighted average")
    workspace: Name | None = Field(
        None, description="where the client keeps its tokenized data and local runs; default: OUTPUT_DIR/clients/"
        "NAME when posttrain starts the federation, else ~/.cache/posttrain/federated/NAME"
    )

    _files = field_validator("data", "eval", mode="before")(_sources)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _CLIENT_NAME.fullmatch(v):
            raise ValueError(f"client name {v!r} must be 1-64 letters, digits or '_.-', starting with a letter "
                             f"or digit")
        return v


class FederatedSettings(_Section):
    rounds: int = Field(3, ge=1, description="rounds of (send global adapter, local training, aggregation)")
    strategy: Literal["fedavg", "fedprox"] = Field(
        "fedavg", description="fedavg: weighted average of the clients' adapters (McMahan et al. 2017); fedprox: "
        "the same average, with proximal_mu/2 * ||w - w_global||^2 added to each client's local loss "
        "(Li et al. 2020)"
    )
    proximal_mu: float = Field(0.0, ge=0, description="FedProx's mu; needs strategy fedprox")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the connected clients that train in a round "
                            "(at least one; drawn with training.seed)")
    min_clients: int | None = Field(
        None, ge=1, description="clients that must be connected before a round starts; default: every client "
        "listed in clients (required when there is no list)"
    )
    superlink: str | None = Field(
        None, description="HOST:PORT of a running Flower SuperLink whose SuperNodes hold the clients; default: "
        "posttrain starts a SuperLink and one SuperNode per listed client on this machine"
    )
    root_certificates: Name | None = Field(None, description="CA certificate (PEM) of a TLS SuperLink")
    insecure: bool = Field(False, description="talk to the given SuperLink without TLS (local federations always do, "
                           "on 127.0.0.1 only)")
    round_timeout_s: float = Field(3600.0, gt=0, description="how long the server waits for the clients' replies")
    run_timeout_s: float | None = Field(
        None, gt=0, description="stop the whole run (every process posttrain started) after this many seconds; "
        "default: no limit"
    )


class FederatedConfig(_Section):
    model: ModelConfig
    method: Literal[FEDERATED_METHODS] = "sft"
    tuning: TuningConfig = Field(default_factory=lambda: TuningConfig(mode="lora"))
    data: DataSettings = Field(default_factory=DataSettings)
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="each client's local training in every round: max_steps local "
        "steps (or epochs over its data); the schedule restarts each round"
    )
    federated: FederatedSettings = Field(default_factory=FederatedSettings)
    clients: list[ClientSpec] = Field(default_factory=list)
    eval: EvalConfig | None = Field(
        None, description="suites run by the server on the global adapter before the first round and after every "
        "round (a perplexity suite gives the held-out loss, a generation suite the accuracy)"
    )
    output_dir: Name

    @model_validator(mode="after")
    def _fits(self) -> "FederatedConfig":
        if self.tuning.mode not in FEDERATED_MODES:
            raise ValueError(
                f"tuning.mode={self.tuning.mode}: federated training sends and averages adapter weights only, so it "
                f"needs an adapter mode whose weights are one small state dict ({', '.join(FEDERATED_MODES)}); "
                f"set tuning.mode=lora"
            )
        fed = self.federated
        if fed.strategy == "fedavg" and fed.proximal_mu > 0:
            raise ValueError("federated.proximal_mu is FedProx's term: set federated.strategy=fedprox, or remove it")
        if fed.strategy == "fedprox" and fed.proximal_mu == 0:
            raise ValueError("federated.strategy=fedprox needs federated.proximal_mu > 0 (e.g. 0.01); with 0 it is "
                             "fedavg")
        names = [c.name for c in self.clients]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"clients: names must be unique; repeated: {dupes}")
        if fed.superlink is None and not self.clients:
            raise ValueError("clients: a local federation (no federated.superlink) needs at least one client")
        if fed.superlink is None and fed.min_clients is not None and fed.min_clients > len(self.clients):
            raise ValueError(f"federated.min_clients={fed.min_clients} is more than the {len(self.clients)} clients "
                             f"listed")
        if fed.superlink is not None and not self.clients and fed.min_clients is None:
            raise ValueError("federated.min_clients: with a remote federated.superlink and no clients list, say how "
                             "many clients must be connected before a round starts")
        if fed.superlink is not None and not (fed.insecure or fed.root_certificates):
            raise ValueError("federated.superlink: give federated.root_certificates for a TLS SuperLink, or set "
                             "federated.insecure=true to send the adapters unencrypted")
        t = self.training
        if t.l2_to_start > 0:
            raise ValueError("training.l2_to_start: a client's round starts from the global adapter, and FedProx's "
                             "pull toward it is that same term; set federated.strategy=fedprox with "
                             "federated.proximal_mu instead")
        if t.save_steps is not None or t.early_stopping_patience is not None:
            raise ValueError("training.save_steps / training.early_stopping_patience: a client's local training is "
                             "one round; the server keeps every round's adapter in rounds/. Remove them")
        return self

    def expected_clients(self) -> int:
        return self.federated.min_clients or len(self.clients)

    def require_client_data(self) -> None:
        """A local federation starts a SuperNode per listed client: each needs its data files."""
        missing = [f"clients[{i}] ({c.name})" for i, c in enumerate(self.clients) if not c.data]
        if self.federated.superlink is None and missing:
            raise ConfigError(f"{', '.join(missing)}: no data. A local federation trains every listed client on its "
                              f"clients[i].data files")

    def for_server(self) -> "FederatedConfig":
        """What the ServerApp is given: the clients' names and weights only, none of their paths."""
        names = [ClientSpec(name=c.name, weight=c.weight) for c in self.clients]
        return self.model_copy(update={"clients": names})

    def recipe(self) -> dict:
        """What every client needs besides its own data: sent to the clients with each round's adapter.

        ``tuning.lora.init_from`` is the server's: it sets the first global adapter, which the clients receive.
        """
        recipe = self.model_dump(mode="json", include={"model", "method", "tuning", "data", "training"})
        recipe["tuning"]["lora"]["init_from"] = None
        return recipe


def load_federated_config(path: str | Path, overrides: list[str] | None = None) -> FederatedConfig:
    """Read, override and validate a federated config; relative paths are made absolute.

    A relative path is taken from the working directory, or from the config's folder when it is not found
    there. Every path is absolute afterwards: the server and client processes do not share a working directory.
    """
    raw = apply_overrides(read_yaml(path), overrides or [])
    cfg = parse_federated_config(raw, str(path))
    cfg.require_client_data()
    base = Path(path).resolve().parent
    for client in cfg.clients:
        for src in [*client.data, *client.eval]:
            src.path = _absolute(src.path, base)
        if client.workspace is not None:
            client.workspace = str(Path(client.workspace).expanduser().resolve())
    if cfg.eval is not None:
        for suite in cfg.eval.suites:
            if suite.path is not None:
                suite.path = _absolute(suite.path, base)
    if Path(cfg.model.name_or_path).exists() or (base / cfg.model.name_or_path).exists():
        cfg.model.name_or_path = _absolute(cfg.model.name_or_path, base)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    init_from = cfg.tuning.lora.init_from
    if init_from is not None:
        cfg.tuning.lora.init_from = _absolute(init_from, base)
        if not Path(cfg.tuning.lora.init_from).is_dir():
            raise ConfigError(f"tuning.lora.init_from={init_from!r}: no such adapter folder "
                              f"({cfg.tuning.lora.init_from})")
    return cfg


def parse_federated_config(raw: dict, source: str = "config") -> FederatedConfig:
    try:
        cfg = FederatedConfig.model_validate(copy.deepcopy(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, FederatedConfig)) from None
    # The stage config's cross-field checks, on the round config every client will build: refused here, not
    # by each client at round 1.
    probe = ClientSpec(name="probe", data=["probe.jsonl"])
    client_run_config(cfg.recipe(), probe, Path("probe"), Path("probe") / "round", cfg.training.seed,
                      who=f"{source} (the recipe every client trains with)")
    return cfg


def _absolute(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (base / p).exists():
        p = base / p
    return str(p.resolve())


def load_client_spec(path: str | Path) -> ClientSpec:
    """A client's spec file (YAML), as a SuperNode's ``client`` node config names it."""
    raw = read_yaml(path)
    try:
        spec = ClientSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path), ClientSpec)) from None
    if not spec.data:
        raise ConfigError(f"{path}: data: required, not given (the client's training files)")
    base = Path(path).resolve().parent
    for src in [*spec.data, *spec.eval]:
        src.path = _absolute(src.path, base)
    return spec


def client_run_config(recipe: dict, spec: ClientSpec, workspace: Path, run_dir: Path, seed: int,
                      who: str | None = None) -> RunConfig:
    """The stage config of one client's local training: the recipe on the client's own files.

    A refusal is prefixed with ``who`` (default: the client's name).
    """
    from posttrain.config import load_config

    raw = copy.deepcopy(recipe)
    raw["data"] = {**raw.get("data", {}), "train": [s.model_dump(mode="json") for s in spec.data],
                   "eval": [s.model_dump(mode="json") for s in spec.eval], "cache_dir": str(workspace / "cache")}
    raw["training"] = {**raw.get("training", {}), "seed": seed, "progress_bar": False}
    raw["output_dir"] = str(run_dir)
    try:
        return load_config(None, raw=raw)
    except ConfigError as exc:
        raise ConfigError(f"{who or f'client {spec.name}'}: {exc}") from None


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)
