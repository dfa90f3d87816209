"""The served model: one base model with its LoRA adapters, prompt encoding, and a token-by-token decoding loop.

``resolve_models`` turns the command line (a model folder or a training run's output dir, plus
``NAME=DIR`` adapters) into the ids that requests name. ``load_backend`` loads them: the
transformers backend below, or vLLM (``posttrain/serve/vllm_backend.py``) when asked for and
available. Both take batches of ``Sequence`` objects (one per choice of a request) and report
their text as it is produced through ``Sequence.on_text``.

The transformers backend decodes with its own loop rather than ``model.generate``: one forward
pass per step over a left-padded batch with a KV cache, so that each new token can be handed
out at once, a cancelled sequence leaves the batch at the next step, and a batch whose
sequences have all been cancelled stops computing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.errors import MissingExtraError, PosttrainError
from posttrain.models.load import adapter_base, is_adapter_folder
from posttrain.tuning.kept import kept_adapter_kind
from posttrain.serve.schemas import ApiError

log = logging.getLogger("posttrain.serve")

BACKENDS = ("auto", "transformers", "vllm")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# What to generate


@dataclass(frozen=True)
class Sampling:
    """How one sequence is sampled. ``temperature == 0`` is greedy; ``stop`` strings end the text (left out)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1; got {self.max_tokens}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")


def _ignore(text: str, finish_reason: str | None) -> None:
    pass


@dataclass(eq=False)
class Sequence:
    """One completion to generate: choice ``index`` of a request, under ``adapter`` (None: the base model).

    The backend fills in the result fields and calls ``on_text(new_text, finish_reason)`` from its
    thread as text is produced; ``finish_reason`` ("stop" or "length") is set on the last call only.
    Setting ``cancelled`` (from any thread) makes the backend drop the sequence at its next step;
    a dropped sequence never gets a finish reason.
    """

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None
    index: int = 0
    on_text: Callable[[str, str | None], None] = _ignore
    cancelled: bool = False
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None

    def emit(self, text: str, finish_reason: str | None = None) -> None:
        self.text += text
        if finish_reason is not None:
            self.finish_reason = finish_reason
        self.on_text(text, finish_reason)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed``: independent streams, any int accepted."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------------------------
# Which models are served


@dataclass
class ModelSet:
    """The ids a server answers to: the base model and its adapters, the default, and accepted aliases."""

    base_path: str
    base_id: str
    adapters: dict[str, str] = field(default_factory=dict)  # id -> adapter folder
    default: str = ""
    aliases: dict[str, str] = field(default_factory=dict)  # accepted name -> id
    tokenizer_path: str = ""

    @property
    def ids(self) -> list[str]:
        """The default model first."""
        return [self.default] + [i for i in (self.base_id, *self.adapters) if i != self.default]


def _served_name(path: Path) -> str:
    """The id a folder is served as: its name, or its run's name for a run's ``final/``."""
    path = path.resolve()
    return path.parent.name if path.name == "final" else path.name


def _model_dir(path: Path) -> tuple[Path, str]:
    """The model folder of ``path`` (a run's ``final/`` when it is a training run) and the name to serve it as."""
    if (path / "final").is_dir():
        path = path / "final"
    kind = kept_adapter_kind(path)
    if kind is not None:
        raise PosttrainError(
            f"{path} holds a {kind} adapter; serving takes full models and LoRA / IA3 adapters (a {kind} adapter "
            f"adds virtual tokens or layers that the streaming decoder does not handle). Evaluate it with "
            f"posttrain eval instead"
        )
    if path.is_dir() and not (path / "config.json").is_file() and not is_adapter_folder(path):
        hint = " (the run has no final/ model yet: serve one of its checkpoints/ instead)" if (
            path / "run.json").is_file() else ""
        raise PosttrainError(f"{path} holds no model (no config.json, adapter_config.json or final/){hint}")
    return path, _served_name(path)


def _base_name(base: str) -> str:
    return _served_name(Path(base)) if Path(base).exists() else base


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def resolve_models(model_or_run_dir: str, adapters: dict[str, str] | None = None) -> ModelSet:
    """The model set of ``posttrain serve MODEL_OR_RUN_DIR --adapter NAME=DIR ...``.

    MODEL_OR_RUN_DIR is a model folder, a hub id, or a training run's output dir (its ``final/``).
    When that model is a LoRA adapter, it is served over its base: both are listed, the adapter
    (named after the run) is the default. Each extra adapter may also be a run dir.
    """
    source = Path(model_or_run_dir)
    if source.exists():
        model_dir, name = _model_dir(source)
    elif "/" in model_or_run_dir and not model_or_run_dir.startswith((".", "/")):
        model_dir, name = Path(model_or_run_dir), model_or_run_dir  # a hub id: transformers finds it in its cache
    else:
        raise PosttrainError(f"{model_or_run_dir} does not exist (give a model folder or a training run's folder)")
    served: dict[str, str] = {}
    if is_adapter_folder(model_dir):
        base_path = adapter_base(model_dir)
        served[name] = str(model_dir)
        base_id = _base_name(base_path)
    else:
        base_path, base_id = str(model_dir), name
    for adapter_id, adapter_path in (adapters or {}).items():
        if not adapter_id or any(c.isspace() for c in adapter_id):
            raise PosttrainError(f"--adapter NAME=DIR: the name {adapter_id!r} must be non-empty, without spaces")
        if adapter_id in served or adapter_id == base_id:
            raise PosttrainError(f"--adapter {adapter_id}=...: the id {adapter_id!r} is already served; pick another")
        adapter_dir, _ = _model_dir(Path(adapter_path)) if Path(adapter_path).exists() else (Path(adapter_path), "")
        if not is_adapter_folder(adapter_dir):
            raise PosttrainError(f"--adapter {adapter_id}={adapter_path}: not a LoRA adapter folder "
                                 "(no adapter_config.json there or in its final/)")
        own_base = adapter_base(adapter_dir)
        if not _same_model(own_base, base_path):
            log.warning("adapter %s was trained on %s; it is served over %s", adapter_id, own_base, base_path)
        served[adapter_id] = str(adapter_dir)
    default = name if name in served else base_id
    aliases = {i: i for i in (base_id, *served)}
    aliases.update({model_or_run_dir: default, str(source.resolve()): default, base_path: base_id})
    for adapter_id, adapter_path in (adapters or {}).items():
        aliases.setdefault(adapter_path, adapter_id)
    # A run's final/ keeps the tokenizer (and chat template) the run trained with.
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    tokenizer_path = str(model_dir) if has_tokenizer or not source.exists() else base_path
    return ModelSet(base_path, base_id, served, default, aliases, tokenizer_path)


# ---------------------------------------------------------------------------------------------------------------
# Backends


class Backend:
    """What the server and the chat CLI need from a loaded model: ids, prompts, limits, generation."""

    name = "base"

    def __init__(self, models: ModelSet, tokenizer, *, context_length: int, vocab_size: int, extra_stop_ids=()):
        from posttrain.generation import stop_token_ids

        self.models = models
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.vocab_size = int(vocab_size)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.stop_ids = list(dict.fromkeys([*stop_token_ids(tokenizer), *extra_stop_ids]))
        # Rust tokenizers refuse to be used from two threads at once ("Already borrowed"): the
        # event loop encodes prompts while the generation thread decodes.
        self.tokenizer_lock = threading.Lock()

    @property
    def model_ids(self) -> list[str]:
        return self.models.ids

    def resolve(self, model: str | None) -> str:
        """The id a request's ``model`` names (the default when it names none); 404 when unknown."""
        if model is None:
            return self.models.default
        if model in self.models.aliases:
            return self.models.aliases[model]
        raise ApiError(404, f"The model {model!r} does not exist; this server serves: {', '.join(self.model_ids)}",
                       param="model", code="model_not_found")

    def adapter_of(self, model_id: str) -> str | None:
        return model_id if model_id in self.models.adapters else None

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the chat template, ready for the assistant's reply."""
        if not self.has_chat_template:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        with self.tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template may raise anything (raise_exception, bad roles)
                raise ApiError(400, f"the model's chat template cannot render these messages: {exc}",
                               param="messages") from None
            _check_utf8(text, "messages")
            # The template writes any BOS itself; the tokenizer must not add a second one.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            _check_utf8(prompt, "prompt")
            with self.tokenizer_lock:
                return list(self.tokenizer(prompt)["input_ids"])
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param="prompt")
        return list(prompt)

    def fit(self, prompt_len: int, max_tokens: int | None, *, param: str) -> int:
        """The completion budget of a prompt: ``max_tokens`` clamped to the room left in the context.

        A prompt that leaves no room for one token is refused (400, context_length_exceeded).
        """
        if prompt_len == 0:
            raise ApiError(400, "the prompt is empty (it encodes to no tokens)", param=param)
        room = self.context_length - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context_length} tokens, and the prompt has "
                f"{prompt_len} tokens, which leaves no room for a completion. Please shorten the prompt.",
                param=param, code="context_length_exceeded",
            )
        return room if max_tokens is None else min(max_tokens, room)

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, seqs: list[Sequence]) -> None:
        """Generate every sequence to its end (or its cancellation). All share one adapter."""
        raise NotImplementedError


def _check_utf8(text: str, param: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode text: {exc.reason} at character {exc.start}",
                       param=param) from None


class TextStream:
    """Turns a sequence's tokens into text deltas, cut at the first stop string.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in
    something that may be the start of a stop string, so that a stop string is never sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """The new text that can be sent after ``token``, and whether a stop string has ended the text."""
        self._ids.append(token)
        self._text = self._decode(self._ids)
        hits = [i for i in (self._text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        if self._text.endswith("\ufffd"):
            return "", False
        return self._take(len(self._text) - self._held_back()), False

    def flush(self) -> str:
        """The text held back so far (the sequence ended without a stop string)."""
        return self._take(len(self._text))

    def _held_back(self) -> int:
        text = self._text
        return max((k for s in self._stop for k in range(min(len(s) - 1, len(text) - self._sent), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def _take(self, end: int) -> str:
        out = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        return out


class _Row:
    """One sequence inside a running batch."""

    def __init__(self, seq: Sequence, backend: Backend, device: torch.device):
        self.seq = seq
        self.stop_ids = set(backend.stop_ids)
        self.stream = TextStream(backend.decode, seq.sampling.stop)
        self.generator = None
        if seq.sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            if seq.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(choice_seed(seq.sampling.seed, seq.index))

    def pick(self, logits: torch.Tensor) -> int:
        sampling = self.seq.sampling
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            probs, order = probs.sort(descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p (the first always).
            probs = probs * ((probs.cumsum(-1) - probs) < sampling.top_p)
            return int(order[torch.multinomial(probs, 1, generator=self.generator)])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int) -> bool:
        """Take one generated token; True when the sequence has ended."""
        seq = self.seq
        seq.completion_tokens += 1
        if token in self.stop_ids:
            seq.emit(self.stream.flush(), "stop")
            return True
        text, stopped = self.stream.push(token)
        if stopped:
            seq.emit(text, "stop")
        elif seq.completion_tokens >= seq.sampling.max_tokens:
            seq.emit(text + self.stream.flush(), "length")
        elif text:
            seq.emit(text)
        return seq.finish_reason is not None


class TransformersBackend(Backend):
    """The base model (with its adapters through peft) on one device; decodes a batch step by step."""

    name = "transformers"

    def __init__(self, models: ModelSet, *, device: str | None = None, dtype: str = "auto"):
        from transformers import AutoTokenizer

        from posttrain.config import ModelConfig
        from posttrain.models.load import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
            torch_dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        else:
            torch_dtype = _DTYPES[dtype]
        try:
            tokenizer = AutoTokenizer.from_pretrained(models.tokenizer_path)
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"cannot load the tokenizer {models.tokenizer_path}: {exc}") from None
        # posttrain's loader: a model folder or hub id, or an adapter stage's chain merged down to a full model.
        model = load_model(ModelConfig(name_or_path=models.base_path, dtype=str(torch_dtype).replace("torch.", "")))
        model.to(device).eval()
        if models.adapters:
            from peft import PeftModel

            (first, first_dir), *rest = models.adapters.items()
            try:
                model = PeftModel.from_pretrained(model, first_dir, adapter_name=first, is_trainable=False)
                for name, path in rest:
                    model.load_adapter(path, adapter_name=name, is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise PosttrainError(f"cannot load the adapters {dict(models.adapters)} over "
                                     f"{models.base_path}: {exc}") from None
            model.eval()
        config = model.config
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        super().__init__(models, tokenizer, context_length=min(context, 10**7), vocab_size=config.vocab_size,
                         extra_stop_ids=eos_ids)
        self.model = model
        self.device = torch.device(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def _adapter_scope(self, adapter: str | None):
        if not self.models.adapters:
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter, inference_mode=True)
        return nullcontext()

    def generate(self, seqs: list[Sequence]) -> None:
        rows = [_Row(seq, self, self.device) for seq in seqs if not seq.cancelled]
        if not rows:
            return
        adapters = {row.seq.adapter for row in rows}
        if len(adapters) > 1:
            raise ValueError(f"one batch must use one adapter; got {adapters}")
        with torch.inference_mode(), self._adapter_scope(adapters.pop()):
            self._decode(rows)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _decode(self, rows: list[_Row]) -> None:
        from transformers import DynamicCache

        width = max(len(row.seq.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            # Left padding: every row's next token comes from the last column.
            input_ids[i, width - len(row.seq.prompt_ids):] = torch.tensor(row.seq.prompt_ids, dtype=torch.long)
            mask[i, width - len(row.seq.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        while True:
            greedy = logits.argmax(-1).tolist()  # one transfer for every greedy row
            tokens = [greedy[i] if row.generator is None else row.pick(logits[i]) for i, row in enumerate(rows)]
            keep = []
            for i, (row, token) in enumerate(zip(rows, tokens)):
                # A cancelled sequence leaves without a word: nobody is listening any more.
                if not row.seq.cancelled and not row.push(token):
                    keep.append(i)
            if not keep:
                return
            next_ids = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=self.device)[:, None]
            if len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(next_ids, mask, positions, cache)


def load_backend(model_or_run_dir: str, adapters: dict[str, str] | None = None, *, backend: str = "auto",
                 dtype: str = "auto", device: str | None = None) -> Backend:
    """Load what ``posttrain serve`` / ``posttrain chat`` serve. "auto": vLLM when installed and a GPU is present."""
    if backend not in BACKENDS:
        raise PosttrainError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if dtype != "auto" and dtype not in _DTYPES:
        raise PosttrainError(f"--dtype must be auto or one of {', '.join(_DTYPES)}; got {dtype!r}")
    models = resolve_models(model_or_run_dir, adapters)
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        backend = "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    if backend == "transformers":
        return TransformersBackend(models, device=device, dtype=dtype)
    if not has_vllm:
        raise MissingExtraError("vllm", "vllm", "posttrain serve --backend vllm")
    if not torch.cuda.is_available():
        raise PosttrainError("--backend vllm needs a CUDA GPU; none is visible (use --backend transformers)")
    from posttrain.serve.vllm_backend import VLLMBackend

    return VLLMBackend(models, dtype=dtype)
