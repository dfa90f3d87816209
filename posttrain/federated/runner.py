"""``posttrain federated``: submit the Flower app, to a running SuperLink or to a federation started here.

Without ``federated.superlink`` this machine plays every part, each in its own process as in a real
deployment: a SuperLink on 127.0.0.1 and one SuperNode per listed client, each given only its own client spec
file (``OUTPUT_DIR/clients/NAME/client.yaml``). The app is submitted with ``flwr run``; the SuperLink starts
the ServerApp, which writes the output directory; every process is stopped at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from posttrain import __version__
from posttrain.errors import MissingExtraError, PosttrainError
from posttrain.federated.config import CONFIG_KEY, FederatedConfig, dump_yaml
from posttrain.io import atomic_write_text, free_port

_APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "posttrain-federated"
version = "{version}"
description = "posttrain's federated adapter training (generated; see docs/federated.md)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "posttrain"

[tool.flwr.app.components]
serverapp = "posttrain.federated.app:server_app"
clientapp = "posttrain.federated.app:client_app"

[tool.flwr.app.config]
{config_key} = {config}
"""


def require_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise MissingExtraError("flwr", "federated", "posttrain federated")


def run_federated(cfg: FederatedConfig, *, overwrite: bool = False, log=print) -> Path:
    """Run every round; returns the final adapter folder (on the SuperLink's machine for a remote SuperLink)."""
    require_flower()
    cfg.require_client_data()
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        init_from = cfg.tuning.lora.init_from
        if init_from is not None and Path(init_from).resolve().is_relative_to(out.resolve()):
            raise PosttrainError(f"tuning.lora.init_from={init_from} is inside output_dir {out}, which a new run "
                                 f"replaces: copy the adapter out of it first, or choose another output_dir")
        if not overwrite:
            raise PosttrainError(f"output_dir {out} already holds a run; choose another output_dir or pass "
                                 f"--overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    flower = out / "flower"
    (flower / "logs").mkdir(parents=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg.model_dump(mode="json")))
    atomic_write_text(out / "run.json", json.dumps({
        "status": "running", "method": f"federated-{cfg.federated.strategy}", "seed": cfg.training.seed,
        "clients": [c.name for c in cfg.clients], "rounds": cfg.federated.rounds, "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "flwr": _flwr_version(), "posttrain": __version__,
    }, indent=2))
    app = flower / "app"
    app.mkdir()
    # A TOML basic string is a JSON string (the same escapes), which holds the YAML whole.
    server_config = dump_yaml(cfg.for_server().model_dump(mode="json"))
    atomic_write_text(app / "pyproject.toml", _APP_TOML.format(version=__version__, config_key=CONFIG_KEY,
                                                               config=json.dumps(server_config)))
    env = _flower_env(flower / "home")
    processes: list[subprocess.Popen] = []
    try:
        if cfg.federated.superlink is None:
            address = _start_local_federation(cfg, out, env, processes, log)
            _write_connection(env, address, insecure=True, root_certificates=None)
        else:
            address = cfg.federated.superlink
            _write_connection(env, address, cfg.federated.insecure, cfg.federated.root_certificates)
        log(f"federated: submitting the app to the SuperLink at {address} ({cfg.federated.rounds} rounds)")
        code = _submit(app, env, flower / "logs", processes, cfg.federated.run_timeout_s)
    except BaseException as exc:
        update_run_json(out, status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                        error=str(exc) or type(exc).__name__)
        raise
    finally:
        for proc in reversed(processes):
            _stop(proc)
    if code != 0:
        update_run_json(out, status="failed", error=f"flwr run exited with {code}")
        raise PosttrainError(f"flwr run failed (exit {code}); see {flower / 'logs' / 'run.log'}")
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    if info.get("status") == "completed":
        return out / "final"
    if cfg.federated.superlink is not None:
        update_run_json(out, status="completed", output_on="the SuperLink's machine",
                        ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        log(f"federated: the run finished; the ServerApp wrote {out} on the SuperLink's machine")
        return out / "final"
    raise PosttrainError(f"the federated run did not complete ({info.get('error', 'no error recorded')}); see "
                         f"{flower / 'logs'} (run.log: the server, supernode-NAME.log: each client)")


def _submit(app: Path, env: dict, logs: Path, processes: list[subprocess.Popen], timeout_s: float | None) -> int:
    """``flwr run`` the app and wait for it; fails when a local SuperLink or SuperNode dies, or past the deadline.

    A dead SuperNode would otherwise leave the server waiting for ``min_clients`` until every round times out.
    """
    deadline = time.monotonic() + timeout_s if timeout_s else None
    with open(logs / "run.log", "wb") as run_log:
        submit = subprocess.Popen([_tool("flwr"), "run", str(app), "posttrain", "--stream"], env=env,
                                  stdout=run_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while submit.poll() is None:
                dead = [p for p in processes if p.poll() is not None]
                if dead:
                    raise PosttrainError(f"a local Flower process exited early (code {dead[0].returncode}: "
                                         f"{Path(dead[0].args[0]).name}); see the logs in {logs}")
                if deadline is not None and time.monotonic() > deadline:
                    raise PosttrainError(f"the federated run passed federated.run_timeout_s={timeout_s:g} and was "
                                         f"stopped; see the logs in {logs}")
                time.sleep(1.0)
        finally:
            _stop(submit)
    return submit.returncode


def update_run_json(out: Path, **fields) -> None:
    path = out / "run.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    info.update(fields)
    atomic_write_text(path, json.dumps(info, indent=2, default=str))


def _flwr_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return None


def _tool(name: str) -> str:
    """A Flower command, from this interpreter's environment first (a virtual env need not be activated)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise MissingExtraError("flwr", "federated", f"posttrain federated (the `{name}` command)")
    return found


def _flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)  # Flower's own config and installed apps stay inside the run
    # The SuperLink and SuperNodes start further Flower commands by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _write_connection(env: dict, address: str, insecure: bool, root_certificates: str | None) -> None:
    lines = ["[superlink]", 'default = "posttrain"', "", "[superlink.posttrain]", f"address = {json.dumps(address)}",
             f"insecure = {'true' if insecure else 'false'}"]
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    atomic_write_text(Path(env["FLWR_HOME"]) / "config.toml", "\n".join(lines) + "\n")


def _start_local_federation(cfg: FederatedConfig, out: Path, env: dict, processes: list, log) -> str:
    logs = out / "flower" / "logs"
    port = free_port()
    processes.append(_spawn([_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                             "--disable-runtime-dependency-installation"], env, logs / "superlink.log"))
    _wait_for_port(port, processes[-1], logs / "superlink.log")
    # The clients share this machine's cores: each gets its share of threads instead of all of them.
    threads = str(max(1, (os.cpu_count() or 1) // len(cfg.clients)))
    for client in cfg.clients:
        workspace = Path(client.workspace) if client.workspace else out / "clients" / client.name
        spec = client.model_copy(update={"workspace": str(workspace)})
        spec_file = workspace / "client.yaml"
        atomic_write_text(spec_file, dump_yaml(spec.model_dump(mode="json")))
        node_env = {**env, "OMP_NUM_THREADS": threads}
        processes.append(_spawn([_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                 "--port", str(free_port()), "--node-config", f"client={json.dumps(str(spec_file))}"],
                                node_env, logs / f"supernode-{client.name}.log"))
    log(f"federated: local SuperLink on 127.0.0.1:{port}, {len(cfg.clients)} SuperNodes "
        f"({', '.join(c.name for c in cfg.clients)}); logs in {logs}")
    return f"127.0.0.1:{port}"


def _spawn(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PosttrainError(f"the local Flower SuperLink exited (code {proc.returncode}); see {log_path}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise PosttrainError(f"the local Flower SuperLink did not open port {port} within {timeout:.0f} s; see {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: Flower's processes then stop the ServerApp / ClientApp processes they started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
