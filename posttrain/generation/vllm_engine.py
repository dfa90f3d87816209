"""Generation with vLLM (optional, GPU only): a separate copy of the weights, refreshed by ``sync_weights``.

Nothing here runs without vLLM and a GPU; the CPU test suite only checks that asking for
this engine without vLLM gives one clear error. ``generate`` and ``sync_weights`` are
exercised on a GPU machine only.

Log-probs: vLLM reports the sampled token's log-prob under the distribution its
``logprobs_mode`` names. ``raw_logprobs`` (asked for here when the installed vLLM has the
setting) is ``log_softmax(logits)`` before temperature, penalties and top-p: it equals
``Generation.logprobs`` exactly when the temperature is 1 (or greedy). At another
temperature it is the temperature-1 value, and the trainer's recomputation shows the gap.
Older vLLM reports processed log-probs (after temperature and top-p), which match when
``top_p == 1``.
"""

from __future__ import annotations

import os

from posttrain.errors import MissingExtraError
from posttrain.generation.base import Generation, SamplingParams
from posttrain.models.checkpoint import is_peft


class VLLMEngine:
    def __init__(
        self,
        model_path_or_name: str,
        tokenizer,
        *,
        stop_token_ids: list[int],
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
    ):
        try:
            import vllm
            from vllm.engine.arg_utils import EngineArgs
        except ImportError as exc:
            raise MissingExtraError("vllm", "vllm", "generation.engine=vllm") from exc
        if not model_path_or_name:
            raise ValueError("the vllm engine loads its own copy of the model: give the path or name to load")
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token (e.g. the end-of-turn token)")
        # In-process engine core (read when the LLM starts): sync_weights reaches the model
        # without crossing processes.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        extra = {"logprobs_mode": "raw_logprobs"} if hasattr(EngineArgs, "logprobs_mode") else {}
        self.llm = vllm.LLM(
            model=str(model_path_or_name),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            **extra,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` completions for each prompt (token ids), in prompt order."""
        per_prompt = [
            self._vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=self.stop_token_ids,
                # Stop where the transformers engine stops: at stop_token_ids only, not at the model's EOS.
                ignore_eos=True,
                logprobs=0,
                # One stream per prompt: two identical prompts must not get identical samples.
                seed=None if params.seed is None else params.seed + index * params.n,
                detokenize=False,
            )
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(prompt)} for prompt in prompts], per_prompt, use_tqdm=False
        )
        return [
            [self._to_generation(index, completion) for completion in output.outputs]
            for index, output in enumerate(outputs)
        ]

    def _to_generation(self, index: int, completion) -> Generation:
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs)]
        stopped = completion.finish_reason == "stop" and bool(ids) and ids[-1] in self.stop_token_ids
        text = self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        return Generation(index, ids, logprobs, text, "stop" if stopped else "length")

    def sync_weights(self, model) -> None:
        """Copy the policy's current weights into vLLM's model (a LoRA adapter is merged in for the copy).

        Uses the in-process model runner when reachable, else ``collective_rpc``.
        """
        merged = is_peft(model)
        if merged:
            model.merge_adapter()
        try:
            weights = list(_plain_state_dict(model).items())
            runner_model = _in_process_model(self.llm)
            if runner_model is not None:
                runner_model.load_weights(weights)
            else:
                self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        finally:
            if merged:
                model.unmerge_adapter()


def _plain_state_dict(model) -> dict:
    """The state dict under the base model's own names: peft's wrappers and adapter tensors left out."""
    plain = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        plain[name.replace(".modules_to_save.default.", ".")] = tensor.detach()
    return plain


def _in_process_model(llm):
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    # vLLM's V1 wraps the worker once more than V0 did.
    worker = getattr(worker, "worker", worker)
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "model", None)


def _load_weights_on_worker(worker, weights) -> None:
    worker.model_runner.model.load_weights(weights)
