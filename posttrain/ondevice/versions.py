"""Adapter versions on a device: each new version trained on top of the current one, with rollback.

A device folder::

    DEVICE_DIR/
      device.json        the base every version adapts: model, quantization, LoRA settings
      current.json       the pointer: {"current": "v2", "previous": "v1"}, replaced atomically
      versions/v1/       a peft LoRA adapter folder + version.json (parent, sizes, memory, losses)
      versions/v2/
      runs/v1/           each version's training run (run.json, metrics.jsonl, final/)

A new version is a stage run whose LoRA starts from the current version's weights (``tuning.lora.init_from``)
and keeps training them, so every version folder holds the whole adapter: it loads alone over the base, and a
rollback only moves the pointer. A version exists only once it is complete; the pointer moves last.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import RunConfig
from posttrain.errors import ConfigError, PosttrainError
from posttrain.io import atomic_dir, atomic_write_text

_VERSION = re.compile(r"v(\d+)")


@dataclass
class Version:
    name: str
    path: Path
    info: dict


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"cannot read {path}: {exc}") from None


def versions(device_dir: str | Path) -> list[Version]:
    """The complete versions of a device folder, oldest first."""
    root = Path(device_dir) / "versions"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if _VERSION.fullmatch(p.name) and (p / "version.json").is_file():
                found.append(Version(p.name, p, _read_json(p / "version.json")))
    return sorted(found, key=lambda v: int(v.name[1:]))


def current_version(device_dir: str | Path) -> Version | None:
    pointer = Path(device_dir) / "current.json"
    if not pointer.is_file():
        return None
    name = _read_json(pointer).get("current")
    for v in versions(device_dir):
        if v.name == name:
            return v
    raise PosttrainError(f"{pointer} points at version {name!r}, which is not in {Path(device_dir) / 'versions'}")


def _set_current(device_dir: Path, name: str, previous: str | None) -> None:
    atomic_write_text(device_dir / "current.json", json.dumps({"current": name, "previous": previous,
                                                               "changed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


def _base_identity(cfg: RunConfig) -> dict:
    lora = cfg.tuning.lora
    return {"model": cfg.model.name_or_path, "quantize": cfg.model.quantize, "dtype": cfg.model.dtype,
            "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules,
                     "use_dora": lora.use_dora, "use_rslora": lora.use_rslora}}


def _check_base(device_dir: Path, cfg: RunConfig) -> None:
    saved_path = device_dir / "device.json"
    if not saved_path.is_file():
        return
    saved, mine = _read_json(saved_path), _base_identity(cfg)
    differ = [k for k in mine if saved.get(k) != mine[k]]
    if differ:
        shown = "; ".join(f"{k}: device {saved.get(k)!r}, config {mine[k]!r}" for k in differ)
        raise ConfigError(f"{device_dir}: every version adapts the same base with the same LoRA shape, and this "
                          f"config differs ({shown})")


def train_version(cfg: RunConfig, device_dir: str | Path, log=print) -> Version:
    """Train the next version on top of the current one and make it current; returns it.

    ``cfg.output_dir`` is replaced by ``DEVICE_DIR/runs/vN``. With ``memory.over_budget=fail`` a run whose
    peak resident memory passed ``memory.budget_mb`` is refused: it does not become a version.
    """
    from posttrain.trainers.stage import run_stage

    device_dir = Path(device_dir).resolve()
    if cfg.tuning.mode != "lora":
        raise ConfigError(f"posttrain device train: versions are LoRA adapters; tuning.mode is {cfg.tuning.mode}. "
                          f"Set tuning.mode=lora")
    if cfg.tuning.lora.init_from:
        raise ConfigError("posttrain device train sets tuning.lora.init_from itself (the current version); remove it")
    _check_base(device_dir, cfg)
    current = current_version(device_dir)
    existing = versions(device_dir)
    name = f"v{int(existing[-1].name[1:]) + 1 if existing else 1}"
    tuning = cfg.tuning.model_copy(deep=True)
    if current is not None:
        tuning.lora.init_from = str(current.path)
    run_dir = device_dir / "runs" / name
    cfg = cfg.model_copy(update={"tuning": tuning, "output_dir": str(run_dir)})
    log(f"device: training {name}" + (f" on top of {current.name}" if current else " (the first version)"))
    final = run_stage(cfg, overwrite=True, log=log)
    run = _read_json(run_dir / "run.json")
    if cfg.memory.budget_mb is not None and not run.get("within_memory_budget", True):
        message = (f"{name}: the training peaked at {run.get('peak_rss_mb')} MiB resident, over memory.budget_mb="
                   f"{cfg.memory.budget_mb:g}")
        if cfg.memory.over_budget == "fail":
            raise PosttrainError(f"{message}; not made a version (the run is in {run_dir})")
        log(f"warning: {message} (memory.over_budget=warn: kept)")
    adapter = final / "adapter_model.safetensors"
    info = {"version": name, "parent": current.name if current else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(run_dir),
            "adapter_bytes": adapter.stat().st_size, "base_bytes": _weights_bytes(Path(cfg.model.name_or_path)),
            "peak_rss_mb": run.get("peak_rss_mb"), "memory_budget_mb": cfg.memory.budget_mb,
            "train_loss": _last(run_dir / "metrics.jsonl", "loss"),
            "eval_loss": _last(run_dir / "metrics.jsonl", "eval_loss")}
    target = device_dir / "versions" / name
    with atomic_dir(target) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        atomic_write_text(tmp / "version.json", json.dumps(info, indent=2))
    if not (device_dir / "device.json").is_file():
        atomic_write_text(device_dir / "device.json", json.dumps(_base_identity(cfg), indent=2))
    _set_current(device_dir, name, current.name if current else None)
    log(f"device: {name} is current ({info['adapter_bytes']:,} bytes of adapter)")
    return Version(name, target, info)


def rollback(device_dir: str | Path, to: str | None = None) -> tuple[str, str]:
    """Point the device back at ``to`` (default: the current version's parent); returns (from, to)."""
    device_dir = Path(device_dir)
    current = current_version(device_dir)
    if current is None:
        raise PosttrainError(f"{device_dir} has no current version to roll back from")
    names = [v.name for v in versions(device_dir)]
    target = to or current.info.get("parent")
    if target is None:
        raise PosttrainError(f"{current.name} is the first version of {device_dir}: there is nothing before it")
    if target not in names:
        raise PosttrainError(f"{device_dir} has no version {target!r}; versions: {', '.join(names)}")
    _set_current(device_dir, target, current.name)
    return current.name, target


def load_device_model(device_dir: str | Path, version: str | None = None):
    """(model, tokenizer): the device's base, quantized as trained, with a version's adapter (default: current)."""
    from peft import PeftModel

    from posttrain.config import ModelConfig
    from posttrain.models.load import load_model, load_tokenizer

    device_dir = Path(device_dir)
    chosen = current_version(device_dir) if version is None else next(
        (v for v in versions(device_dir) if v.name == version), None)
    if chosen is None:
        raise PosttrainError(f"{device_dir}: no version {'is current' if version is None else repr(version)}")
    base = _read_json(device_dir / "device.json")
    model_cfg = ModelConfig(name_or_path=base["model"], quantize=base["quantize"], dtype=base["dtype"])
    model = PeftModel.from_pretrained(load_model(model_cfg, "lora"), str(chosen.path))
    return model.eval(), load_tokenizer(model_cfg)


def _weights_bytes(folder: Path) -> int | None:
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def _last(metrics: Path, key: str) -> float | None:
    if not metrics.is_file():
        return None
    values = [json.loads(x).get(key) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    values = [v for v in values if isinstance(v, (int, float))]
    return values[-1] if values else None
