"""``posttrain plan``: read the model's config, predict every tuning mode's peak, recommend a path."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from posttrain.data.formats import FORMATS
from posttrain.errors import ConfigError, PosttrainError
from posttrain.plan.lengths import LengthStats
from posttrain.plan.memory import Estimate, Settings, estimate, parse_size
from posttrain.plan.recommend import GOALS, USABLE, Recommendation, fit, recommend
from posttrain.plan.shape import PLAN_MODES, Architecture, default_tuning

DEFAULT_SEQ_LEN = 2048


class PlanRequest(BaseModel):
    """What ``posttrain plan`` is asked; each field is a command-line option."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="a local Hugging Face model folder or hub id; only its config is read")
    gpu_memory: Annotated[int, BeforeValidator(lambda v: parse_size(v) if isinstance(v, str) else v)] = Field(
        gt=0, description="memory of one GPU, e.g. 24GiB, 80GB, 40G (G = GiB)")
    gpus: int = Field(1, ge=1, description="GPUs of that size (posttrain trains them data-parallel)")
    data: str | None = Field(None, description="a data file: its token lengths choose the sequence length")
    data_format: Literal[FORMATS] | None = Field(None, description="the data file's format; default: from its keys")
    goal: Literal[GOALS] = Field("instruction", description="what the training is for; decides the stages")
    seq_len: int | None = Field(None, ge=8, description="tokens per sequence; default: from --data, else 2048")
    batch_size: int = Field(1, ge=1, description="sequences per micro-batch on each GPU")
    private_data: bool = Field(False, description="the data may not leave its owner's machines")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16", description="training.mixed_precision")
    device: Literal["cuda", "cpu"] = Field("cuda", description="what the memory is predicted for")
    chunked_head: bool = Field(True, description="training.chunked_head: the LM head on scored rows, in chunks; "
                               "false: full logits")
    trust_remote_code: bool = Field(False, description="allow the model's own code (custom architectures)")

    @model_validator(mode="after")
    def _format_needs_data(self) -> PlanRequest:
        if self.data_format is not None and self.data is None:
            raise ValueError("--data-format describes --data; give --data FILE too, or leave --data-format out")
        return self


def plan_request(options: dict) -> PlanRequest:
    """Validate the options (CLI names with dashes or underscores); errors name the option."""
    options = {k.replace("-", "_"): v for k, v in options.items()}
    try:
        return PlanRequest.model_validate(options)
    except ValidationError as exc:
        lines = ["invalid plan options:"]
        for err in exc.errors():
            name = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else ""
            ctx = err.get("ctx") or {}
            reason = str(ctx["error"]) if err["type"] == "value_error" and "error" in ctx else err["msg"]
            given = "" if not err["loc"] or err["type"] == "value_error" else f"given {err.get('input')!r}; "
            lines.append(f"  {name}: {given}{reason}" if name else f"  {reason}")
        raise ConfigError("\n".join(lines)) from None


@dataclass
class Plan:
    request: PlanRequest
    architecture: Architecture
    settings: Settings
    seq_len_source: str
    estimates: dict[str, Estimate]
    recommendation: Recommendation
    lengths: LengthStats | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        budget = self.request.gpu_memory
        modes = []
        for e in self.estimates.values():
            f = fit(e, budget)
            modes.append({**e.to_dict(), "fits": f.fits and not f.checkpointing,
                          "fits_with_checkpointing": f.fits})
        return {
            "model": asdict(self.architecture),
            "gpu_memory_bytes": budget, "gpus": self.request.gpus, "usable_fraction": USABLE,
            "settings": {**asdict(self.settings), "seq_len_source": self.seq_len_source},
            "goal": self.request.goal, "private_data": self.request.private_data,
            "data": self.lengths.to_dict() if self.lengths else None,
            "recommendation": self.recommendation.to_dict(),
            "modes": modes,
            "notes": self.notes,
        }


def _sharded_peak(e: Estimate, gpus: int) -> int:
    """The peak if weights, gradients and optimizer states were split evenly over ``gpus`` (ZeRO-3 / FSDP)."""
    states = (e.weights + e.optimizer) // gpus
    return states + max(e.activations_checkpointed + e.logits + e.autocast_copies,
                        (e.gradients + e.optimizer_scratch) // gpus)


def make_plan(req: PlanRequest, modes: tuple[str, ...] = PLAN_MODES) -> Plan:
    """The plan for ``req``; ``modes`` limits which tuning modes are counted (each costs a copy of the model)."""
    from posttrain.plan.shape import (
        architecture,
        describe_modes,
        empty_model,
        read_config,
    )

    config = read_config(req.model, req.trust_remote_code)
    model = empty_model(config, req.trust_remote_code)
    arch = architecture(model, config, req.model)
    notes = []
    lengths = _data_lengths(req, arch) if req.data is not None else None
    if req.seq_len is not None:
        seq_len, source = req.seq_len, "--seq-len"
    elif lengths is not None:
        seq_len, source = lengths.suggested_seq_len, f"99th percentile of {req.data}"
    else:
        seq_len = min(DEFAULT_SEQ_LEN, arch.max_positions or DEFAULT_SEQ_LEN)
        source = "default"
    if arch.max_positions and seq_len > arch.max_positions:
        notes.append(f"seq_len {seq_len} is above the model's max_position_embeddings ({arch.max_positions})")
    if arch.experts:
        notes.append(f"mixture of experts ({arch.experts} experts): parameters are exact, activations assume a "
                     f"dense MLP of intermediate_size per token (an estimate)")
    if not arch.gated_mlp or arch.model_type not in ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"):
        notes.append(f"activations are counted for Llama-style blocks; for {arch.model_type} they are an estimate")
    settings = Settings(seq_len=seq_len, batch_size=req.batch_size, mixed_precision=req.mixed_precision,
                        device=req.device, chunked_head=req.chunked_head, gpus=req.gpus)
    shapes = describe_modes(model, default_tuning(arch.layers), modes)
    if req.device == "cpu" and "qlora" in shapes:
        shapes["qlora"] = replace(shapes["qlora"], unavailable="QLoRA needs a CUDA GPU (bitsandbytes)")
    estimates = {m: estimate(arch, s, settings) for m, s in shapes.items()}
    pairs = None
    if req.goal == "preference":
        doubled = replace(settings, batch_size=2 * settings.batch_size)
        pairs = {m: estimate(arch, s, doubled) for m, s in shapes.items()}
    sharded = {m: _sharded_peak(e, req.gpus) for m, e in estimates.items() if not e.unavailable}
    rec = recommend(arch.params, req.gpu_memory, estimates, goal=req.goal, private=req.private_data, gpus=req.gpus,
                    batch_size=req.batch_size, adapter_bytes=4 * shapes["lora"].trainable if "lora" in shapes else None,
                    pair_estimates=pairs, sharded=sharded)
    return Plan(req, arch, settings, source, estimates, rec, lengths, notes)


def _data_lengths(req: PlanRequest, arch: Architecture) -> LengthStats:
    from posttrain.config import ModelConfig
    from posttrain.models.load import load_tokenizer
    from posttrain.plan.lengths import detect_format, summarize, token_lengths

    fmt = req.data_format or detect_format(req.data)
    try:
        tokenizer = load_tokenizer(ModelConfig(name_or_path=req.model, trust_remote_code=req.trust_remote_code))
    except PosttrainError as exc:
        raise PosttrainError(f"--data needs the model's tokenizer to count tokens: {exc}") from None
    lengths, dropped = token_lengths(req.data, fmt, tokenizer)
    return summarize(req.data, fmt, lengths, dropped, arch.max_positions, req.seq_len)


_COLUMNS = (("weights", "weights"), ("grads", "gradients"), ("AdamW", "optimizer"), ("scratch", "optimizer_scratch"),
            ("activ.", "activations"), ("act.ckpt", "activations_checkpointed"), ("logits", "logits"),
            ("16-bit", "autocast_copies"), ("DDP", "ddp_buckets"), ("peak", "total"), ("pk.ckpt", "total_checkpointed"))


def format_plan(plan: Plan) -> str:
    a, s, req = plan.architecture, plan.settings, plan.request
    budget = req.gpu_memory
    gib = 1024**3
    out = [
        (f"model: {a.name} ({a.model_type}, {_count(a.params)} parameters, {a.layers} layers, hidden {a.hidden}, "
         f"vocab {a.vocab}{', tied embeddings' if a.tied_embeddings else ''})"),
        (f"run: seq_len {s.seq_len} ({plan.seq_len_source}), batch {s.batch_size} per GPU, mixed precision "
         f"{s.mixed_precision}, {req.gpus} x {budget / gib:.1f} GiB ({s.device}); fits = peak <= {USABLE:.0%} of it "
         f"({budget * USABLE / gib:.1f} GiB)"),
    ]
    if plan.lengths:
        ln = plan.lengths
        out.append(f"data: {ln.path} ({ln.format}): {ln.rows} rows ({ln.dropped} unusable); tokens min {ln.min}, "
                   f"median {ln.p50}, p90 {ln.p90}, p99 {ln.p99}, max {ln.max}, mean {ln.mean}; "
                   f"suggested seq_len {ln.suggested_seq_len}; {ln.longer} rows are longer than {ln.seq_len}")
    out.append("")
    out.append("recommended path:")
    rec = plan.recommendation
    for k, step in enumerate(rec.steps, 1):
        out.append(f"  {k}. {step.what}: {step.why}")
    for note in rec.notes + plan.notes:
        out.append(f"  note: {note}")
    out.append("")
    largest = max((e.total for e in plan.estimates.values()), default=0)
    unit, scale = ("GiB", gib) if largest >= gib else ("MiB", 1024**2)
    out.append(f"predicted peak memory per GPU ({unit}) of one training step at seq_len {s.seq_len}, "
               f"batch {s.batch_size}:")
    header = f"{'mode':<11}{'trainable':>11}" + "".join(f"{c:>9}" for c, _ in _COLUMNS) + "  fits"
    out.append(header)
    for mode, e in plan.estimates.items():
        if e.unavailable:
            out.append(f"{mode:<11}{'-':>11}  not available: {e.unavailable}")
            continue
        f = fit(e, budget)
        verdict = ("yes" if not f.checkpointing else "with checkpointing") if f.fits else "no"
        cells = "".join(f"{getattr(e, key) / scale:>9.2f}" for _, key in _COLUMNS)
        out.append(f"{mode:<11}{_count(e.trainable):>11}{cells}  {verdict}")
    out.append("")
    out.append("16-bit: autocast's copies of the fp32 weights under mixed precision; scratch: AdamW's temporaries; "
               "DDP: gradient buckets (--gpus > 1); "
               "peak ~ weights + AdamW + DDP + max(activations + logits + 16-bit, gradients + scratch) (docs/plan.md)")
    return "\n".join(out)


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)

