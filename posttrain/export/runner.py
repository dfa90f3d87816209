"""``posttrain export``: one standalone, verified model folder from a run, a model or an adapter.

Steps: resolve the input -> load it in float32 (the reference) -> score the probe prompts ->
merge an adapter -> set the generation config to stop at the template's end of turn -> cast to
the export dtype -> write (optionally quantized, optionally with a GGUF file) into a temporary
folder -> reload from disk and compare with the reference -> write export.json -> move the
folder into place. A failed check raises and leaves nothing behind.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import __version__
from posttrain.errors import PosttrainError
from posttrain.export.merge import (
    Source,
    check_finite,
    load_source,
    resolve_source,
    source_config,
    source_tokenizer,
    stored_dtype,
)
from posttrain.export.verify import compare_logits, probe_inputs, probe_logits, tolerance_for
from posttrain.io import atomic_dir, atomic_write_text

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8", "int4")


@dataclass
class ExportResult:
    out: Path
    record: dict  # what export.json holds

    def summary(self) -> str:
        r = self.record
        v = r["verification"]
        lines = [f"exported {r['source']['kind']} {r['source']['path']} -> {self.out}"]
        q = r["quantization"]
        lines.append(f"  dtype {r['dtype']}" + (f", {q['method']} weights ({q['torchao_config']}, "
                                                 f"{q['quantized_linear_layers']} linear layers)" if q else ""))
        lines.append(f"  verified against the source: max |dlogit| {v['max_abs_diff']:.3g} (logit scale "
                     f"{v['scale']:.3g}), mean {v['mean_abs_diff']:.3g}, top-1 agreement {v['top1_agreement']:.1%}, "
                     f"KL {v['kl']:.3g} over {v['positions']} positions; limits {v['thresholds']}")
        g = r["generation"]
        lines.append(f"  generation stops at {', '.join(g['eos_tokens'])} (eos_token_id {g['eos_token_id']})")
        if r["gguf"]:
            g = r["gguf"]
            lines.append(f"  gguf: {self.out / g['file']} ({g['type']}, {g['tensors']} tensors, pre-tokenizer "
                         f"'{g['tokenizer_pre']}'; read back and compared)")
        lines.append(f"  record: {self.out / 'export.json'}")
        return "\n".join(lines)


def export_model(source: str | Path, out: str | Path, *, quantize: str = "none", gguf: bool = False,
                 dtype: str = "auto", overwrite: bool = False, log=print) -> ExportResult:
    """Export ``source`` (a run dir, model folder or adapter folder) to ``out``; see the module docstring."""
    from posttrain.export import gguf as gguf_export
    from posttrain.export import quantize as quant

    if dtype not in DTYPES:
        raise PosttrainError(f"export: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if quantize not in QUANTIZE:
        raise PosttrainError(f"export: quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    if quantize != "none":
        quant.check_quantization(quantize)
    if gguf:
        gguf_export.check_gguf_available()
    src = resolve_source(source)
    out = Path(out)
    _check_target(out, src, overwrite)

    config, tokenizer = source_config(src), source_tokenizer(src)
    dtype = _resolve_dtype(dtype, quantize, stored_dtype(config))
    if gguf:  # refuse an unsupported architecture or tokenizer before loading any weights
        gguf_export.check_supported(config, tokenizer)
    loaded = load_source(src, config, log)
    eot_id = _end_of_turn_id(tokenizer)
    probes = probe_inputs(tokenizer)
    log(f"scoring {len(probes)} probe prompts with the source in float32")
    reference = probe_logits(loaded.model, probes)

    if src.kind == "adapter":
        log("merging the adapter into its base")
    model = loaded.merged()
    check_finite(model, "the merged model")
    _set_generation_config(model, src, tokenizer, eot_id)
    model = model.to(getattr(torch, dtype))
    tolerance = tolerance_for(dtype, quantize)

    with atomic_dir(out) as tmp:
        gguf_info = None
        if gguf:
            gguf_info = gguf_export.write_gguf(model, tokenizer, tmp / "model.gguf", dtype,
                                               name=(src.run_dir or src.path).name, eot_id=eot_id, log=log)
        quant_info = None
        if quantize == "none":
            log(f"saving the {dtype} model with its tokenizer and generation config")
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        else:
            quant_info = quant.save_quantized(model, tokenizer, tmp, quantize, getattr(torch, dtype), log=log)
        log("reloading the export from disk and comparing it with the source")
        exported = load_exported(tmp, dtype, quantize)
        comparison = compare_logits(reference, probe_logits(exported, probes))
        problems = tolerance.failures(comparison) + _check_files(tmp, tokenizer, probes, eot_id)
        if problems:
            raise PosttrainError(
                f"export: verification failed, nothing was written to {out}. The model reloaded from the export "
                f"differs from the source {src.path}: {'; '.join(problems)} (measured: {comparison.summary()})"
            )
        log(f"verified: {comparison.summary()}")
        record = {
            "posttrain": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {"path": str(src.path), "kind": src.kind, "run_dir": str(src.run_dir) if src.run_dir else None,
                       "base_model": src.base},
            "dtype": dtype,
            "model_type": getattr(model.config, "model_type", None),
            "quantization": quant_info,
            "generation": _generation_record(model.generation_config, tokenizer, eot_id),
            "verification": {
                "reference": ("the source adapter on its base, unmerged" if src.kind == "adapter"
                              else "the source model") + ", float32, on the CPU",
                "compared": "the exported folder reloaded from disk with AutoModelForCausalLM",
                **comparison.as_dict(), "thresholds": tolerance.as_dict(), "passed": True,
            },
            "gguf": gguf_info,
            "versions": _versions(),
        }
        atomic_write_text(tmp / "export.json", json.dumps(record, indent=2, default=str))
    log(f"written to {out}")
    return ExportResult(out, record)


def load_exported(folder: Path, dtype: str, quantize: str):
    """The exported model as a user loads it: transformers from the folder alone."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)}
    if quantize == "int4":
        kwargs["device_map"] = "cuda"
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()


def _check_target(out: Path, src: Source, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PosttrainError(f"export: --out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PosttrainError(f"export: {out} already exists and is not empty; choose another --out or pass "
                             f"--overwrite to replace it")
    read = [src.path] + ([Path(src.base)] if src.base else [])
    for p in read:
        if out.resolve() == p.resolve() or out.resolve() in p.resolve().parents:
            raise PosttrainError(f"export: --out {out} would replace {p}, which the export reads; choose another "
                                 f"folder")


def _resolve_dtype(dtype: str, quantize: str, stored: str) -> str:
    if quantize == "int4":
        if dtype not in ("auto", "bfloat16"):
            raise PosttrainError(f"export: int4 weights compute in bfloat16 (torchao's tinygemm kernel); use "
                                 f"--dtype bfloat16 or leave --dtype out (got {dtype})")
        return "bfloat16"
    return stored if dtype == "auto" else dtype


def _end_of_turn_id(tokenizer) -> int | None:
    from posttrain.data.templates import ChatEncoder

    return ChatEncoder(tokenizer).end_of_turn_id if getattr(tokenizer, "chat_template", None) else None


def _set_generation_config(model, src: Source, tokenizer, eot_id: int | None) -> None:
    """The source's generation config, stopping at the template's end of turn and at the tokenizer's EOS."""
    from transformers import GenerationConfig

    gen = model.generation_config
    if src.kind == "adapter" and (src.path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(src.path))  # what the run saved beside its adapter
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stops = list(dict.fromkeys(i for i in [eot_id, *eos, tokenizer.eos_token_id] if i is not None))
    if stops:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen


def _generation_record(gen, tokenizer, eot_id: int | None) -> dict:
    eos = gen.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return {"eos_token_id": eos, "eos_tokens": tokenizer.convert_ids_to_tokens(ids),
            "end_of_turn": tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None}


def _check_files(folder: Path, tokenizer, probes: list[list[int]], eot_id: int | None) -> list[str]:
    """The tokenizer, chat template and stop tokens as written must be the ones the model was checked with."""
    from transformers import AutoTokenizer, GenerationConfig

    problems = []
    saved = AutoTokenizer.from_pretrained(str(folder))
    if getattr(saved, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        problems.append("the saved tokenizer's chat template differs from the source's")
    elif probe_inputs(saved) != probes:
        problems.append("the saved tokenizer encodes the probe prompts differently")
    eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if eot_id is not None and eot_id not in eos:
        problems.append(f"generation_config.json's eos_token_id {eos} lacks the end-of-turn token {eot_id}")
    return problems


def _versions() -> dict:
    out = {}
    for package in ("torch", "transformers", "peft", "safetensors", "torchao", "gguf"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
