"""The recommended path: which tuning mode, which stages, and why, from the predicted peaks.

Rules, in order:

1. The tuning mode is the most capable one that fits one GPU: full fine-tuning, else LoRA over a 16-bit
   base, else QLoRA over a 4-bit base, else nothing (the reasons name what would help). "Fits" means the
   predicted peak is at most ``USABLE`` of the GPU's memory (the CUDA context and the allocator's
   fragmentation take the rest); gradient checkpointing is used only when the mode needs it to fit.
   A preference stage scores chosen and rejected together, so it is checked at twice the batch.
2. The stages follow the goal: instruction -> SFT (a multi-task mix when full fine-tuning fits without
   checkpointing); preference -> SFT then DPO; reasoning -> SFT then GRPO on verifiable rewards;
   domain -> continued pretraining then SFT.
3. Private data -> train where the data is (on the device, or the owner's server), or federated LoRA when it
   is split among owners who cannot pool it; either way only an adapter leaves the data's machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from posttrain.plan.memory import Estimate, format_bytes

USABLE = 0.9
GOALS = ("instruction", "preference", "reasoning", "domain")
_PREFERENCE = ("preference",)
# The order modes are tried in: each trains less (or over a smaller base) than the one before.
_LADDER = ("full", "lora", "qlora")
_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


@dataclass(frozen=True)
class Fit:
    mode: str
    fits: bool
    checkpointing: bool  # needs gradient checkpointing to fit
    peak: int  # the peak it is judged by (with checkpointing when it needs it)


@dataclass(frozen=True)
class Step:
    what: str
    why: str


@dataclass
class Recommendation:
    mode: str | None
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "steps": [asdict(s) for s in self.steps], "notes": self.notes}


def fit(estimate: Estimate, budget: int) -> Fit:
    """Whether a mode fits ``budget`` bytes, preferring no gradient checkpointing."""
    usable = USABLE * budget
    if estimate.unavailable:
        return Fit(estimate.mode, False, False, 0)
    if estimate.total <= usable:
        return Fit(estimate.mode, True, False, estimate.total)
    return Fit(estimate.mode, estimate.total_checkpointed <= usable, True, estimate.total_checkpointed)


def choose_mode(fits: dict[str, Fit]) -> str | None:
    return next((m for m in _LADDER if m in fits and fits[m].fits), None)


def recommend(params: int, budget: int, estimates: dict[str, Estimate], *, goal: str = "instruction",
              private: bool = False, gpus: int = 1, batch_size: int = 1, adapter_bytes: int | None = None,
              pair_estimates: dict[str, Estimate] | None = None, sharded: dict[str, int] | None = None,
              ) -> Recommendation:
    """The path for a model of ``params`` parameters on GPUs of ``budget`` bytes.

    ``pair_estimates``: the same modes at twice the batch (a preference stage); ``sharded``: each mode's
    peak if weights, gradients and optimizer states were split over ``gpus`` (for a note only);
    ``adapter_bytes``: the size of a LoRA adapter, what private-data paths ship instead of data.
    """
    fits = {m: fit(e, budget) for m, e in estimates.items()}
    if goal in _PREFERENCE and pair_estimates:
        # The preference stage must fit too: it decides the mode of both stages.
        fits = {m: fit(pair_estimates[m], budget) if f.fits else f for m, f in fits.items()}
    mode = choose_mode(fits)
    rec = Recommendation(mode)
    memory = format_bytes(budget)
    size = f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
    if mode is None:
        tried = [f for m, f in fits.items() if m in _LADDER and f.peak]
        smallest = min(tried, key=lambda f: f.peak) if tried else None
        what = (f"the smallest predicted peak ({format_bytes(smallest.peak)}, {_NAMES[smallest.mode]}"
                f"{' with checkpointing' if smallest.checkpointing else ''})" if smallest else "no mode can run")
        shorter = "shorten --seq-len" + (", lower --batch-size" if batch_size > 1 else "")
        rec.steps.append(Step(
            "no tuning mode fits",
            f"{what} is above {USABLE:.0%} of {memory}; {shorter}, use a GPU with more memory, or a smaller model",
        ))
        _sharding_note(rec, sharded, budget, gpus)
        return rec
    chosen = fits[mode]
    how = _NAMES[mode] + (" with gradient checkpointing" if chosen.checkpointing else "")
    why = _why_mode(mode, fits, size, memory)
    if goal in _PREFERENCE and pair_estimates:
        why += "; peaks of the DPO stage, which scores chosen and rejected together (twice the batch)"
    rec.steps.append(Step(f"tune with {how}", why))
    if chosen.checkpointing:
        rec.notes.append("set training.gradient_checkpointing: true (blocks are recomputed in backward: about a "
                         "third more compute for much less activation memory)")
    ample = mode == "full" and not chosen.checkpointing
    rec.steps.extend(_stages(goal, _NAMES[mode] if mode != "full" else "full", ample))
    if private:
        rec.steps.extend(_private_steps(params, adapter_bytes))
    if gpus > 1:
        rec.notes.append(f"{gpus} GPUs: posttrain trains data-parallel (DDP), so every GPU holds the per-GPU peak "
                         f"(with DDP's gradient buckets, 4 bytes per trained parameter); "
                         f"more GPUs raise throughput (global batch = batch x accumulation x {gpus}), not capacity")
    if mode != "full":
        _sharding_note(rec, sharded, budget, gpus)
    return rec


def _why_mode(mode: str, fits: dict[str, Fit], size: str, memory: str) -> str:
    peak = format_bytes(fits[mode].peak)
    if mode == "full":
        return (f"every weight of the {size} model trains and the peak ({peak}) fits {memory}: the most "
                f"learning per example, and the result is a plain model")
    full = fits.get("full")
    full_text = f"full fine-tuning needs {format_bytes(full.peak)}" if full and full.peak else "full does not fit"
    if mode == "lora":
        return (f"{full_text}, above {USABLE:.0%} of {memory}; LoRA keeps the {size} base frozen (bf16 on a GPU) and "
                f"trains small adapters ({peak})")
    lora = fits.get("lora")
    lora_text = f"LoRA needs {format_bytes(lora.peak)}" if lora and lora.peak else "LoRA does not fit"
    return (f"{full_text} and {lora_text}; QLoRA stores the {size} base in 4 bits and trains the same adapters "
            f"({peak}) on one {memory} GPU")


def _stages(goal: str, mode_name: str, ample: bool) -> list[Step]:
    if goal == "preference":
        return [Step(f"then SFT ({mode_name}) on instruction data",
                     "DPO starts from a model that already answers in the target format"),
                Step(f"then DPO ({mode_name}) on preference pairs",
                     "learns from chosen/rejected pairs without a reward model; with adapters the reference is "
                     "the base with them off, so no second model is held")]
    if goal == "reasoning":
        return [Step(f"then SFT ({mode_name}) on worked solutions", "teaches the answer format GRPO's rewards check"),
                Step(f"then GRPO ({mode_name}) with verifiable rewards",
                     "rewards checked answers rather than imitation; generation also needs KV-cache memory, "
                     "not counted here")]
    if goal == "domain":
        return [Step(f"then continued pretraining ({mode_name}) on domain text",
                     "method pretrain with packing: the model learns the domain's language"),
                Step(f"then SFT ({mode_name}) on instruction data",
                     "restores instruction following after the domain stage")]
    if ample:
        return [Step("then full SFT on a multi-task mix",
                     "memory is ample (full fits without checkpointing): several data.train files with weights "
                     "teach many tasks at once and forget less than one narrow task")]
    return [Step(f"then SFT ({mode_name}) on instruction data", "supervised answers teach the target behaviour")]


def _private_steps(params: int, adapter_bytes: int | None) -> list[Step]:
    where = "on the device" if params <= 3e9 else "on the owner's own GPU server"
    adapter = f"the LoRA adapter ({format_bytes(adapter_bytes)})" if adapter_bytes else "the adapter"
    return [
        Step(f"private data, one owner: train where it lives ({where}; posttrain device train)",
             f"the data never leaves its machine; what is copied off is {adapter}, not the data"
             + ("" if params <= 3e9 else "; above ~3B parameters a phone or laptop is too small")),
        Step("private data, several owners who cannot pool it: federated LoRA (posttrain federated)",
             f"each owner trains on its own rows and only {adapter} travels each round to be averaged "
             f"(FedAvg / FedProx)"),
    ]


def _sharding_note(rec: Recommendation, sharded: dict[str, int] | None, budget: int, gpus: int) -> None:
    if gpus > 1 and sharded and "full" in sharded and sharded["full"] <= USABLE * budget:
        rec.notes.append(f"full fine-tuning would fit if weights, gradients and AdamW states were sharded over "
                         f"{gpus} GPUs ({format_bytes(sharded['full'])} per GPU, an even split; the memory "
                         f"above is for DDP): distributed.strategy=fsdp or deepspeed with zero_stage 3 "
                         f"(docs/distributed.md)")
