"""`posttrain train` starting its own processes: the data is tokenized once, here, before any process group.

With ``distributed.num_processes`` set and no launcher around it, the command tokenizes the stage's data into
the cache, then runs ``accelerate launch`` with the same command line; every process then reads the cache, so
none waits on another's preprocessing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from posttrain.config import RunConfig
from posttrain.errors import PosttrainError
from posttrain.io import free_port

# Set by torchrun / accelerate launch in every process they start; the last by us, in case a launcher sets none.
_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "POSTTRAIN_LAUNCHED")


def under_launcher() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def wants_launch(cfg: RunConfig) -> bool:
    d = cfg.distributed
    return d.num_processes is not None and (d.num_processes > 1 or d.num_machines > 1) and not under_launcher()


def launch_command(cfg: RunConfig, posttrain_args: list[str]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``posttrain <posttrain_args>`` on every process."""
    d = cfg.distributed
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(d.num_processes * d.num_machines), "--num_machines", str(d.num_machines),
           "--machine_rank", str(d.machine_rank), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if d.num_machines > 1:
        cmd += ["--main_process_ip", str(d.main_process_ip), "--main_process_port", str(d.main_process_port or 29500)]
    else:
        cmd += ["--main_process_port", str(d.main_process_port or free_port())]
    # torchrun under accelerate's name: also on CPUs, where each process then forms a gloo group (its --cpu
    # would start one process). The engine (FSDP, DeepSpeed) is chosen in the posttrain config, not here.
    cmd += ["--multi_gpu"]
    return cmd + ["-m", "posttrain", *posttrain_args]


def launch(cfg: RunConfig, posttrain_args: list[str], *, resume: bool, overwrite: bool, log=print) -> None:
    """Tokenize into the cache, then run the training processes and wait for them."""
    from pathlib import Path

    from posttrain.trainers.stage import prepare_data

    out = Path(cfg.output_dir)
    # Refused before any work; on the main machine only, since the others share its filesystem.
    if cfg.distributed.machine_rank == 0 and out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise PosttrainError(f"output_dir {out} already holds a run. Continue it with --resume, choose another "
                             f"output_dir, or pass --overwrite to replace it")
    log("tokenizing the data once, before the processes start")
    prepare_data(cfg, log=log)
    cmd = launch_command(cfg, posttrain_args)
    d = cfg.distributed
    where = f" on machine {d.machine_rank} of {d.num_machines}" if d.num_machines > 1 else ""
    log(f"starting {d.num_processes} processes{where}: {' '.join(cmd[1:])}")
    code = subprocess.call(cmd, env={**os.environ, "POSTTRAIN_LAUNCHED": "1"})
    if code != 0:
        raise PosttrainError(f"the training processes failed (exit status {code}); their messages are above. "
                             f"Continue with --resume once fixed")
