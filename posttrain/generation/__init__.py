"""Generation engines for online RL: sample completions with the log-probs of their tokens.

Every engine has ``generate(prompts, params) -> list[list[Generation]]`` (``params.n``
generations per prompt) and ``sync_weights(model)`` (make the engine sample from the
policy's current weights).
"""

from __future__ import annotations

import importlib.util

import torch

from posttrain.generation.base import Generation, SamplingParams
from posttrain.generation.transformers_engine import TransformersEngine

ENGINES = ("auto", "transformers", "vllm")


def stop_token_ids(tokenizer) -> list[int]:
    """Where a response ends: the chat template's end-of-turn token and the tokenizer's EOS (deduplicated)."""
    from posttrain.data.templates import ChatEncoder

    eot = ChatEncoder(tokenizer).end_of_turn_id
    return list(dict.fromkeys(i for i in (eot, tokenizer.eos_token_id) if i is not None))


def resolve_engine(requested: str, vllm_can_load: bool = True) -> str:
    """"transformers" or "vllm" for a config's ``generation.engine``.

    "auto" is vLLM when it is installed, a GPU is present and ``vllm_can_load`` the model (it loads merged
    weights under the base's names, so an adapter being trained samples through transformers).
    """
    if requested not in ENGINES:
        raise ValueError(f"generation engine must be one of {', '.join(ENGINES)}; got {requested!r}")
    if requested != "auto":
        return requested
    if vllm_can_load and importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        return "vllm"
    return "transformers"


def sampling_params(gen, *, greedy: bool = False, n: int = 1, seed: int | None = None) -> SamplingParams:
    """The ``SamplingParams`` of a config's ``generation`` section; greedy ignores its temperature and top_p."""
    return SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=0.0 if greedy else gen.temperature,
                          top_p=1.0 if greedy else gen.top_p, n=n, seed=seed)


def make_engine(kind: str, model, tokenizer, *, stop_token_ids: list[int], model_path=None, **kw):
    """The engine named by ``kind``; "auto" is vLLM when it is installed and a GPU is present.

    ``model`` is the policy module (used by the transformers engine); ``model_path`` is
    where vLLM loads its own copy from (default: the path ``model`` was loaded from;
    ``sync_weights`` brings that copy up to date). ``kw`` go to the engine's constructor
    (``batch_size`` for transformers; ``gpu_memory_utilization``, ``dtype`` for vLLM).
    """
    kind = resolve_engine(kind)
    if kind == "transformers":
        return TransformersEngine(model, tokenizer, stop_token_ids=stop_token_ids, **kw)
    from posttrain.generation.vllm_engine import VLLMEngine

    path = model_path or getattr(model, "name_or_path", None)
    return VLLMEngine(path, tokenizer, stop_token_ids=stop_token_ids, **kw)


__all__ = ["ENGINES", "Generation", "SamplingParams", "TransformersEngine", "make_engine", "resolve_engine",
           "sampling_params"]
