"""Find what to export, load it in full precision, and merge an adapter into its base.

The input is a training run's output_dir (its ``final/`` is exported), a full Hugging Face
model folder, or a peft adapter folder. Everything is loaded in float32 on the CPU: the
source model is the reference the export is verified against, and merging an adapter in
float32 and casting afterwards rounds once instead of at every step.

A base whose config carries a ``quantization_config`` is loaded unquantized when its weights
are stored in a float format (the config only asked to quantize at load time); a base stored
quantized is refused, because merging a LoRA update into rounded weights loses the update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.models.load import adapter_base, is_adapter_folder, root_model
from posttrain.tuning.kept import kept_adapter_kind

_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16"}
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Source:
    """What the user asked to export, resolved to one folder."""

    path: Path  # the model or adapter folder
    kind: str  # "model" or "adapter"
    run_dir: Path | None = None  # the training run the folder came from, if any
    base: str | None = None  # adapters: the base model named in adapter_config.json


@dataclass
class Loaded:
    source: Source
    model: object  # the float32 source: a PeftModel (unmerged) for adapters, else the causal LM

    def merged(self):
        """The standalone causal LM: the adapter folded into its base (this consumes the PeftModel)."""
        if self.source.kind != "adapter":
            return self.model
        return self.model.merge_and_unload()


def resolve_source(path: str | Path) -> Source:
    p = Path(path)
    if not p.exists():
        raise PosttrainError(f"export: {p} does not exist")
    if not p.is_dir():
        raise PosttrainError(f"export: {p} is a file; give a run directory, a model folder or an adapter folder")
    run_dir = None
    if (p / "run.json").is_file():
        run_dir, p = p, p / "final"
        if not p.is_dir():
            raise PosttrainError(
                f"export: {run_dir} is a training run without a final/ model (run.json status: "
                f"{_run_status(run_dir)}); finish it (posttrain train CONFIG --resume) before exporting"
            )
    kind = kept_adapter_kind(p)
    if kind is not None:
        raise PosttrainError(
            f"export: {p} holds a {kind} adapter, which cannot be merged into its base (it adds virtual tokens "
            f"or layers of its own). Use it where posttrain loads it (posttrain train / eval with "
            f"model.name_or_path={p}); export works on full, freeze, BitFit, LoRA and IA3 outputs"
        )
    if is_adapter_folder(p):
        return _adapter_source(p, run_dir)
    if (p / "config.json").is_file():
        if not any(any(p.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
            raise PosttrainError(f"export: {p} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
        return Source(p, "model", run_dir)
    raise PosttrainError(
        f"export: {p} is neither a training run (run.json + final/), a model folder (config.json + weights) "
        f"nor a peft adapter folder (adapter_config.json)"
    )


def _run_status(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "run.json").read_text()).get("status", "unknown"))
    except (OSError, ValueError):
        return "unreadable"


def _adapter_source(p: Path, run_dir: Path | None) -> Source:
    try:
        cfg = json.loads((p / "adapter_config.json").read_text())
    except ValueError as exc:
        raise PosttrainError(f"export: {p}/adapter_config.json is not valid JSON: {exc}") from None
    if not any(p.glob("adapter_model.*")):
        raise PosttrainError(f"export: {p} has an adapter_config.json but no adapter weights (adapter_model.*)")
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise PosttrainError(
            f"export: the adapter in {p} has task_type {task!r}; export handles causal language models (CAUSAL_LM)"
        )
    return Source(p, "adapter", run_dir, adapter_base(p))


def _model_dir(source: Source) -> tuple[str, str]:
    """The folder holding the architecture and base weights, and how to name it in errors."""
    if source.kind == "adapter":
        return source.base, f"the base model {source.base!r} named in {source.path}/adapter_config.json"
    return str(source.path), f"the model {source.path}"




def source_config(source: Source):
    """The config of the model (or the adapter's base), checked to be a local causal LM; reads no weights."""
    from transformers import AutoConfig

    name, what = _model_dir(source)
    if not Path(name).is_dir():
        raise PosttrainError(
            f"export: {what} is not a local folder (export does not download). Point base_model_name_or_path "
            f"in adapter_config.json at a local copy of the base"
        )
    try:
        config = AutoConfig.from_pretrained(root_model(name))
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"export: cannot read the config of {what}: {exc}") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch and not arch.endswith("ForCausalLM"):
        raise PosttrainError(
            f"export: {what} is a {arch}, not a causal language model; export handles *ForCausalLM models"
        )
    return config


def source_tokenizer(source: Source):
    from transformers import AutoTokenizer

    # An adapter folder written by posttrain holds the tokenizer (and chat template) it was trained with.
    folder = source.path if (source.path / "tokenizer_config.json").is_file() else _model_dir(source)[0]
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"export: cannot load the tokenizer from {folder}: {exc}") from None


def load_source(source: Source, config, log=print) -> Loaded:
    """The source in float32 on the CPU (``config`` from ``source_config``), checked for an empty adapter
    and for non-finite weights."""
    name, what = _model_dir(source)
    if getattr(config, "quantization_config", None) is not None:
        _check_stored_unquantized(Path(name), config.quantization_config, what)
        log(f"{what} has a quantization_config but stores float weights: loading it unquantized")
        del config.quantization_config
    model = _load_weights(name, config, what, log)
    if source.kind == "adapter":
        from peft import PeftModel

        log(f"loading the adapter {source.path} onto {source.base}")
        try:
            model = PeftModel.from_pretrained(model, str(source.path), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise PosttrainError(f"export: cannot load the adapter {source.path} onto {source.base}: {exc}") from None
        check_adapter_not_empty(model, source.path)
    model.eval()
    check_finite(model, str(source.path))
    return Loaded(source, model)


def stored_dtype(config) -> str:
    """The float dtype the weights were saved in (float32 when the config does not say)."""
    stored = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def _load_weights(name: str, config, what: str, log):
    from transformers import AutoModelForCausalLM

    if is_adapter_folder(name):
        # The base is itself an adapter stage: posttrain's loader merges the chain down to a full model.
        from posttrain.config import ModelConfig
        from posttrain.models.load import load_model

        log(f"loading {name} (an adapter over {root_model(name)}) merged, in float32")
        return load_model(ModelConfig(name_or_path=name, dtype="float32"))
    log(f"loading {name} in float32")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32,
                                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PosttrainError(f"export: cannot load {what}: {exc}") from None
    problems = {k: sorted(info[k])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if problems:
        raise PosttrainError(f"export: the weights of {what} do not fit its config: {problems}")
    return model


def _check_stored_unquantized(folder: Path, qconfig, what: str) -> None:
    """Refuse a model whose weights are stored quantized: there is nothing exact to merge into."""
    from safetensors import safe_open

    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", "?")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PosttrainError(
            f"export: {what} is quantized ({method}) and its weights are not safetensors, so export cannot tell "
            f"whether they are stored quantized. Export from an unquantized copy of the model"
        )
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names = st.keys()
            for key in names:
                dtype = st.get_slice(key).get_dtype()
                if dtype not in _FLOAT_STORAGE:
                    raise PosttrainError(
                        f"export: {what} is stored quantized ({method}: {key} is {dtype}). Merging an adapter into "
                        f"rounded weights would lose it, and a quantized model cannot be re-exported exactly. Export "
                        f"from the unquantized model (for an adapter: point base_model_name_or_path in "
                        f"adapter_config.json at an unquantized copy of the base)"
                    )


def check_adapter_not_empty(model, path: Path) -> None:
    """An adapter whose LoRA B matrices are all zero leaves the base unchanged: it was never trained."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    if any(getattr(cfg, "modules_to_save", None) for cfg in model.peft_config.values()):
        return  # whole modules trained beside the adapter change the model even with zero B
    b_mats = [v for k, v in state.items() if "lora_B" in k or "lora_embedding_B" in k]
    if b_mats and all(not torch.count_nonzero(v) for v in b_mats):
        raise PosttrainError(
            f"export: the adapter in {path} is empty: all {len(b_mats)} LoRA B matrices are zero, so it does not "
            f"change the base model (an untrained adapter: did the run take any optimizer steps?)"
        )
    if state and all(not torch.count_nonzero(v) for v in state.values()):
        raise PosttrainError(f"export: every weight of the adapter in {path} is zero; refusing to export it")


def check_finite(model, where: str) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise PosttrainError(
            f"export: {where} has non-finite weights (NaN or inf) in {len(bad)} tensors (first: {bad[0]}); "
            f"refusing to export it"
        )
