"""Peak memory of one training step of posttrain's loop, per device: pure functions of a model's shape.

The step is the loop's: forward, the summed next-token loss (``models/logprobs.py: label_logps``),
backward, gradient clipping and one AdamW update (torch's AdamW: two fp32 states per trained parameter).
The peak is the larger of two moments:

- the start of backward: weights + optimizer states + the activations kept for backward + the loss's
  vocabulary-sized tensors (``logits_bytes``) + under mixed precision autocast's 16-bit weight copies;
- the update: weights + optimizer states + gradients + AdamW's scratch tensors.

Activations are counted tensor by tensor for a Llama-style block (RMSNorm, rotary attention through SDPA
or flash attention, so no sequence-squared term, and a gated or plain MLP): what autograd keeps depends
on what trains, so each tensor is counted only where a gradient needs it. ``docs/plan.md`` lists the
terms and how they were checked against a live-tensor measurement of real steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from posttrain.config import PROMPT_MODES

# The loss path itself: its chunk sizes and which architectures take the chunked head, so the plan follows it.
from posttrain.models import logprobs as loss_path
from posttrain.plan.shape import Architecture, ModeShape

GiB = 1024**3
_ADAM_STATES = 2
# posttrain's QLoRA default, bitsandbytes NF4 with double quantisation: 4 bits per weight, an 8-bit absmax per
# 64 weights and an fp32 constant per 256 absmaxes (Dettmers et al. 2023, sec. 3): 0.5 + 1/64 + 4/(64*256) bytes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Settings:
    """The run the memory is predicted for (per device: every GPU of a DDP run holds all of it)."""

    seq_len: int
    batch_size: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    device: Literal["cuda", "cpu"] = "cuda"
    chunked_head: bool = True  # training.chunked_head
    gpus: int = 1  # data-parallel (DDP) processes: above one, DDP's gradient buckets are added


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes of one mode; ``total`` and ``total_checkpointed`` are the peaks of a step."""

    mode: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    logits: int
    autocast_copies: int
    optimizer_scratch: int
    total: int
    total_checkpointed: int
    trainable: int
    unavailable: str | None = None
    ddp_buckets: int = 0  # DDP's flat gradient buckets (--gpus above 1), part of both totals

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Sizes:
    """Bytes per element of the tensors a step keeps, for the device, precision and mode."""

    weight: int  # the frozen base's weights
    act: int  # matmul, attention and MLP outputs
    stream: int  # what the norms keep: RMSNorm computes in fp32
    residual: int  # the residual stream between blocks (what a checkpointed block keeps): the weights' dtype
    mask: int  # dropout masks: bool on CUDA, the scaled float mask on CPU
    linear_input: int  # a projection's saved input; under autocast each projection saves its own 16-bit copy
    autocast: bool


def _base_dtype_bytes(mode: str, s: Settings) -> int:
    """posttrain's loader with ``model.dtype: auto``: bf16 under LoRA on a GPU, fp32 for what trains in full."""
    return 2 if (mode in ("lora", "dora") and s.device == "cuda") else 4


def _sizes(mode: str, s: Settings) -> _Sizes:
    base = _base_dtype_bytes(mode, s)
    autocast = s.mixed_precision != "no" and s.device == "cuda"
    act = 2 if (autocast or base == 2 or mode == "qlora" and s.device == "cuda") else 4
    # QLoRA's base loads in 16 bits, but prepare_model_for_kbit_training casts the embeddings and norms to fp32,
    # so the residual stream (embedding output + block outputs) and the final norm's output are fp32.
    residual = 2 if base == 2 else 4
    return _Sizes(weight=base, act=act, stream=4, residual=residual, mask=1 if s.device == "cuda" else 4,
                  linear_input=2 if autocast else 4, autocast=autocast)


def weight_bytes(arch: Architecture, ms: ModeShape, s: Settings) -> int:
    """The model in memory: the base in its loaded dtype, adapters and trained weights in fp32.

    QLoRA (posttrain's default ``tuning.qlora``: 4-bit NF4, double quantisation) quantises the blocks' Linear
    weights; ``prepare_model_for_kbit_training`` then casts every other 16-bit parameter (embeddings, output
    head, norms) to fp32.
    """
    adapters = max(ms.total - arch.params, 0)
    if ms.mode == "qlora":
        return round(arch.layer_linear_params * NF4_BYTES + 4 * (arch.params - arch.layer_linear_params)
                     + 4 * adapters)
    return _base_dtype_bytes(ms.mode, s) * arch.params + 4 * adapters


def gradient_bytes(ms: ModeShape) -> int:
    """One fp32 gradient per trained parameter (whatever trains is fp32 in posttrain's loop)."""
    return 4 * ms.trainable


def ddp_bucket_bytes(ms: ModeShape, s: Settings) -> int:
    """With ``gpus > 1`` accelerate wraps the model in DDP (``gradient_as_bucket_view`` off by default): the reducer
    keeps flat buckets of every trained parameter's gradient, allocated once and alive all run, beside ``.grad``."""
    return 4 * ms.trainable if s.gpus > 1 else 0


def optimizer_bytes(ms: ModeShape) -> int:
    """AdamW's exp_avg and exp_avg_sq, fp32, per trained parameter (the fp32 weights are the master copy)."""
    return _ADAM_STATES * 4 * ms.trainable


def optimizer_scratch_bytes(ms: ModeShape, s: Settings) -> int:
    """AdamW's temporaries during the update.

    On CUDA torch's AdamW runs the multi-tensor (foreach) path: ``sqrt(exp_avg_sq)`` of every parameter
    at once, one fp32 copy of all states' size. On CPU it goes tensor by tensor: the square root and its
    quotient of the largest tensor.
    """
    return 4 * ms.trainable if s.device == "cuda" else 2 * 4 * ms.largest


def _block_bytes(arch: Architecture, ms: ModeShape, z: _Sizes, seq: int, kv_len_ratio: float, saves_input: bool,
                 own_weights: bool, adapters: bool) -> float:
    """Bytes per token that one block keeps for backward.

    Always (a gradient passes through): q, k, v and the attention output (SDPA/flash keep them and the
    log-sum-exp; the output projection reads the same output tensor), the residual before the second norm,
    and the MLP's gate, up and act(gate) (a plain MLP: the activation's input). The block's input only when
    something below it trains. Own weights (full, freeze): both norms' normalised outputs, the projections'
    inputs, and the down projection's input. Adapters: what ``ModeShape.adapter_saved`` counts.
    """
    h, i = arch.hidden, arch.intermediate
    kv = arch.kv_dim
    mask = 0.0
    if ms.prefix_tokens:
        # peft hands a prefix's attention mask to every block: SDPA then repeats the key/value heads up to the
        # query heads (no grouped-query shortcut with a mask) and keeps the mask, one row of keys per token.
        kv = arch.q_dim
        mask = z.act * kv_len_ratio * seq
    flow = z.act * (2 * arch.q_dim + 2 * kv * kv_len_ratio) + 4 * arch.heads + mask
    flow += z.stream * h + 4  # residual before the second norm, and that norm's 1/rms
    flow += z.act * (3 * i if arch.gated_mlp else i)
    if saves_input:
        flow += z.stream * h + 4
    total = flow
    if own_weights:
        total += 4 * 2 * h  # RMSNorm's x * 1/rms, kept for its weight's gradient (fp32)
        # The attention input feeds q, k, v (three projections) and the MLP input gate and up (two): one tensor
        # each in fp32; under autocast each projection keeps its own 16-bit cast.
        readers = (3, 2 if arch.gated_mlp else 1) if z.autocast else (1, 1)
        total += z.linear_input * h * sum(readers)
        total += z.act * i  # the down projection's input
    if adapters:
        total += z.act * ms.adapter_saved + z.mask * ms.adapter_masks
    return total


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps from forward to backward (the loss's vocabulary-sized tensors: ``logits_bytes``).

    ``stored``: what the whole forward keeps; with gradient checkpointing each block keeps only its input
    (``checkpoint_stored``) and the block being recomputed in backward holds its full set
    (``checkpoint_recompute``) while the loss's tensors are already gone.
    """

    stored: int
    checkpoint_stored: int
    checkpoint_recompute: int


def _grad_from(ms: ModeShape) -> int | None:
    """The block from which gradients flow upwards: -1 when they reach the input (embeddings, virtual tokens)."""
    return -1 if (ms.embeddings_trained or ms.virtual_tokens) else ms.first_trained_layer


def activation_bytes(arch: Architecture, ms: ModeShape, s: Settings) -> Activations:
    """The blocks' kept tensors (``_block_bytes``) where a gradient needs them, the final norm's, rotary tables."""
    if ms.unavailable:
        return Activations(0, 0, 0)
    z = _sizes(ms.mode, s)
    seq = s.seq_len + ms.virtual_tokens
    tokens = s.batch_size * seq
    kv_ratio = (seq + ms.prefix_tokens) / seq
    first = _grad_from(ms)
    grad_blocks = 0 if first is None else arch.layers - max(first, 0)
    adapter_blocks = ms.adapter_layers if grad_blocks else 0
    per_block = [
        _block_bytes(arch, ms, z, seq, kv_ratio, saves_input=index > first,
                     own_weights=index >= arch.layers - ms.weight_layers,
                     adapters=index >= arch.layers - adapter_blocks)
        for index in range(arch.layers - grad_blocks, arch.layers)
    ]
    head = 0.0
    if grad_blocks:
        head += z.stream * arch.hidden + 4  # the final norm's input and 1/rms
    if ms.final_norm_trained:
        head += 4 * arch.hidden
    if uses_chunked_head(arch, ms, s):
        head += z.residual * arch.hidden  # the scored rows of the last hidden state, the head chunks' input
    elif ms.head_trained:
        head += z.linear_input * arch.hidden
    rope = 2 * arch.head_dim * z.stream if grad_blocks else 0  # cos and sin, shared by all blocks
    return Activations(
        stored=round(tokens * (sum(per_block) + head + rope)),
        checkpoint_stored=round(tokens * (z.residual * arch.hidden * len(per_block) + head + rope)),
        checkpoint_recompute=round(tokens * max(per_block, default=0)),
    )


def uses_chunked_head(arch: Architecture, ms: ModeShape, s: Settings) -> bool:
    """Whether the loss runs the LM head in checkpointed chunks of scored rows (``training.chunked_head``)."""
    return s.chunked_head and arch.model_type in loss_path.PLAIN_HEAD_TYPES and ms.mode not in PROMPT_MODES


def logits_bytes(arch: Architecture, ms: ModeShape, s: Settings) -> int:
    """The loss's vocabulary-sized tensors at their peak, the start of backward; often the largest term.

    posttrain's loss (``models/logprobs.py: label_logps``) takes one of two paths:

    - chunked head (``training.chunked_head``, plain-head architectures, not prompt learning): the head runs
      under checkpointing on one chunk of scored rows at a time; backward recomputes a chunk's logits and
      holds them with log-sum-exp's difference, exponential and product in fp32 (and their 16-bit original
      under mixed precision): 16 (18) bytes per element of one chunk.
    - full logits: the logits of every position are kept for backward (prompt learning's virtual positions
      are cut off first, into a copy); backward adds their gradient and, one chunk of rows at a time, two
      fp32 temporaries (difference, exponential).
    """
    logit = _sizes(ms.mode, s).act  # the head's output dtype: 16-bit under autocast or a 16-bit base
    if uses_chunked_head(arch, ms, s):
        rows = min(s.batch_size * (s.seq_len - 1), loss_path.head_chunk_rows(arch.vocab))
        return (16 + (logit if logit < 4 else 0)) * rows * arch.vocab
    positions = s.batch_size * s.seq_len
    chunk = min(positions, loss_path.logit_chunk_rows(arch.vocab))
    return 2 * logit * positions * arch.vocab + 2 * 4 * chunk * arch.vocab


def autocast_copy_bytes(arch: Architecture, ms: ModeShape, s: Settings) -> int:
    """Under mixed precision with fp32 weights, 16-bit copies of the projection weights a gradient passes.

    autocast caches the cast of each trained weight for the step; a frozen weight's cast is kept for the
    backward of its input. A base loaded in 16 bits (LoRA on a GPU) or quantised needs none.
    """
    z = _sizes(ms.mode, s)
    if not z.autocast or z.weight != 4 or ms.mode == "qlora" or ms.unavailable:
        return 0
    first = _grad_from(ms)
    blocks = 0 if first is None else arch.layers - max(first, 0)
    head = arch.vocab * arch.hidden
    return 2 * (arch.layer_linear_params * blocks // max(arch.layers, 1) + head)


def estimate(arch: Architecture, ms: ModeShape, s: Settings) -> Estimate:
    """Every term and the step's peak for one mode, with and without gradient checkpointing.

    The peak is weights + optimizer states (+ DDP's gradient buckets) + the largest of: activations with the loss's tensors (and the
    16-bit weight copies), gradients with AdamW's scratch. With checkpointing the loss's tensors are freed
    before the first block is recomputed, so stored inputs meet either the loss's tensors or one
    recomputed block, and the last recomputed block meets (almost) all gradients.
    """
    if ms.unavailable:
        return Estimate(ms.mode, *([0] * 11), unavailable=ms.unavailable)
    weights, grads, states = weight_bytes(arch, ms, s), gradient_bytes(ms), optimizer_bytes(ms)
    acts = activation_bytes(arch, ms, s)
    logits = logits_bytes(arch, ms, s)
    copies, scratch = autocast_copy_bytes(arch, ms, s), optimizer_scratch_bytes(ms, s)
    buckets = ddp_bucket_bytes(ms, s)
    static = weights + states + buckets
    transient = 4 * ms.transient  # within the last block's forward, before the loss's tensors exist
    plain = static + max(acts.stored + copies + max(logits, transient), grads + scratch)
    stored, recompute = acts.checkpoint_stored, acts.checkpoint_recompute
    checkpointed = static + max(stored + copies + max(logits, recompute + transient), grads + max(scratch, recompute))
    return Estimate(ms.mode, weights, grads, states, acts.stored, stored + recompute, logits, copies, scratch,
                    plain, checkpointed, ms.trainable, ddp_buckets=buckets)


def parse_size(text: str) -> int:
    """Bytes of a memory size: ``24GiB``, ``24GB`` (10^9), ``80G`` (GiB, as GPU tools print it), ``512MiB``."""
    import re

    from posttrain.errors import PosttrainError

    units = {"": GiB, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
             "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise PosttrainError(f"--gpu-memory {text!r} is not a memory size; write e.g. 24GiB, 24GB, 80G or 16384MiB")
    value = float(m.group(1)) * units[m.group(2).lower()]
    if value <= 0:
        raise PosttrainError(f"--gpu-memory {text!r} must be more than zero")
    return int(value)


def format_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= 1024**2:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"
