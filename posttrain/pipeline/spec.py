"""A pipeline file: named stages sharing defaults, each a normal stage config, expanded into a flat list.

```yaml
output_dir: runs/pipe
defaults: {model: {name_or_path: models/tiny}, training: {...}, eval: {...}}
stages:
  - {name: pretrain, method: pretrain, data: {train: corpus.jsonl}}
  - {name: sft, method: sft, data: {train: chat.jsonl}}
  - {name: rm, method: reward, data: {...}}           # a scorer: it does not feed the next stage's model
  - {name: ppo, method: ppo, online: {rewards: [{type: reward_model, path: "${rm}"}]}}
  - name: loop
    repeat: 2                                          # loop.1.rft, loop.1.simpo, loop.2.rft, ...
    stages: [{name: rft, ...}, {name: simpo, ...}]
```

Model chaining: a stage starts from the previous stage's final model unless it names its own
``model.name_or_path`` or says ``from: STAGE``. A reward-model stage is a scorer, so the stage after it
starts from the policy before it; point at it with ``${NAME}``, which any string value may hold and which
stands for that stage's final model folder. Inside a repeated group, ``${NAME}`` means the stage of the
same round when the group has one by that name, and ``${round}`` is the round number.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import RunConfig, apply_overrides, load_config, read_yaml
from posttrain.errors import ConfigError, PosttrainError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_TOP_KEYS = {"name", "output_dir", "defaults", "stages", "report"}
_STAGE_ONLY = {"name", "from"}


@dataclass
class Stage:
    name: str  # flat and unique: "sft", or "loop.2.rft" inside a repeated group
    raw: dict  # the stage config, defaults merged, references resolved, output_dir set
    config: RunConfig
    start_from: str | None  # the stage whose final model this stage starts from (None: an outside model)
    depends_on: list[str] = field(default_factory=list)  # every stage whose output this one reads

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def final(self) -> Path:
        return self.output_dir / "final"


@dataclass
class Pipeline:
    name: str
    output_dir: Path
    stages: list[Stage]
    report: bool = True
    source: str = "pipeline"

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PosttrainError(f"{self.source}: no stage named {name!r} (stages: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def merge(a: dict, b: dict) -> dict:
    """``b`` deep-merged over ``a`` (neither changed)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read, expand and validate a pipeline file; ``overrides`` (section.key=value) apply to every stage."""
    path = Path(path)
    raw = read_yaml(path)
    return build_pipeline(raw, source=str(path), base_dir=path.resolve().parent, overrides=overrides)


def build_pipeline(raw: dict, *, source: str = "pipeline", base_dir: Path | None = None,
                   overrides: list[str] | None = None) -> Pipeline:
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    if not raw.get("output_dir") or not isinstance(raw["output_dir"], str):
        raise ConfigError(f"{source}: output_dir is required (the folder that holds one sub-folder per stage)")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults must be a mapping of stage config sections")
    if "output_dir" in defaults:
        raise ConfigError(f"{source}: defaults.output_dir is not allowed; each stage goes to OUTPUT_DIR/NAME")
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: stages must be a non-empty list")
    out = Path(raw["output_dir"])
    flat = _expand(entries, source)
    stages: list[Stage] = []
    done: dict[str, Stage] = {}
    previous_policy: str | None = None
    for flat_name, scope, round_no, entry in flat:
        where = f"{source}: stage {flat_name}"
        body = {k: v for k, v in entry.items() if k not in _STAGE_ONLY}
        if "output_dir" in body:
            raise ConfigError(f"{where}: output_dir is set by the pipeline ({out}/{flat_name}); remove it")
        start_from = entry.get("from")
        if start_from is not None:
            start_from = _lookup(str(start_from), scope, done, where, "from")
        own_model = (body.get("model") or {}).get("name_or_path") if isinstance(body.get("model"), dict) else None
        merged = merge(defaults, body)
        merged = apply_overrides(merged, overrides or [])
        deps: list[str] = []
        merged = _resolve(merged, scope, round_no, done, where, deps)
        merged.setdefault("model", {})
        if start_from is not None:
            merged["model"]["name_or_path"] = str(done[start_from].final)
        elif own_model is None and previous_policy is not None:
            start_from = previous_policy
            merged["model"]["name_or_path"] = str(done[previous_policy].final)
        if start_from is not None and start_from not in deps:
            deps.insert(0, start_from)
        merged["output_dir"] = str(out / flat_name)
        try:
            cfg = load_config(None, raw=merged, base_dir=base_dir)
        except ConfigError as exc:
            raise ConfigError(f"{where}: " + str(exc).replace("invalid config (config):", "invalid config:")) from None
        stage = Stage(flat_name, merged, cfg, start_from, deps)
        stages.append(stage)
        done[flat_name] = stage
        if cfg.method != "reward":
            previous_policy = flat_name
    name = raw.get("name") or out.name
    return Pipeline(str(name), out, stages, report=bool(raw.get("report", True)), source=source)


def _expand(entries: list, source: str, prefix: str = "", round_no: int | None = None) -> list:
    """(flat name, scope prefix, round, entry) for every stage, repeated groups unrolled in order."""
    flat, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{source}: stages[{i}]" if not prefix else f"{source}: group {prefix.rstrip('.')} stages[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping with at least a name")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
        if name in seen or name == "round":
            why = "reserved" if name == "round" else "used twice"
            raise ConfigError(f"{where}: the stage name {name!r} is {why}")
        seen.add(name)
        if "stages" in entry or "repeat" in entry:
            extra = set(entry) - {"name", "repeat", "stages"}
            repeat = entry.get("repeat", 1)
            if extra:
                raise ConfigError(
                    f"{where} (group {name}): only name, repeat and stages belong here; got {sorted(extra)}")
            if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
                raise ConfigError(f"{where} (group {name}): repeat must be a whole number >= 1, got {repeat!r}")
            inner = entry.get("stages")
            if not isinstance(inner, list) or not inner:
                raise ConfigError(f"{where} (group {name}): stages must be a non-empty list")
            for r in range(1, repeat + 1):
                flat += _expand(inner, source, f"{prefix}{name}.{r}.", r)
        else:
            flat.append((prefix + name, prefix, round_no, entry))
    return flat


def _lookup(ref: str, scope: str, done: dict, where: str, what: str) -> str:
    """The flat name a reference means: the same round's stage first, then any earlier stage."""
    for candidate in (scope + ref, ref):
        if candidate in done:
            return candidate
    raise ConfigError(f"{where}: {what} {ref!r} names no earlier stage (earlier: {', '.join(done) or 'none'})")


def _resolve(node, scope: str, round_no: int | None, done: dict, where: str, deps: list[str]):
    if isinstance(node, dict):
        return {k: _resolve(v, scope, round_no, done, where, deps) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, scope, round_no, done, where, deps) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match) -> str:
        ref = m.group(1)
        if ref == "round":
            if round_no is None:
                raise ConfigError(f"{where}: ${{round}} is only defined inside a repeated group")
            return str(round_no)
        name = _lookup(ref, scope, done, where, "${...}")
        if name not in deps:
            deps.append(name)
        return str(done[name].final)

    return _REF.sub(sub, node)


__all__ = ["Pipeline", "Stage", "build_pipeline", "load_pipeline", "merge"]
