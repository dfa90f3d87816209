"""The vLLM backend of ``posttrain serve`` (optional; GPU only).

NOT EXERCISED BY THE TEST SUITE: the suite runs on CPU, where this module is never imported
(``load_backend`` picks it only when vLLM is installed and a GPU is visible, or when asked
for by ``--backend vllm``, which is refused without both). It is a thin path:

- each batch the scheduler hands over is one blocking ``LLM.generate`` call, so a streamed
  response gets its whole text in one chunk at the end, and a cancelled request stops only
  if it has not started yet;
- adapters go through vLLM's LoRA support (``LoRARequest``), one adapter per batch as in the
  transformers backend;
- stop strings, stop tokens, seeds, temperature and top-p are vLLM's own, with the same
  stop tokens as the transformers backend (the chat template's end of turn and EOS).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import MissingExtraError, PosttrainError
from posttrain.serve.engine import Backend, ModelSet, Sequence, choice_seed

_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, models: ModelSet, *, dtype: str = "auto", gpu_memory_utilization: float = 0.85):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise MissingExtraError("vllm", "vllm", "posttrain serve --backend vllm") from exc
        from transformers import AutoConfig, AutoTokenizer

        from posttrain.models.load import is_adapter_folder

        if is_adapter_folder(models.base_path):
            raise PosttrainError(
                f"--backend vllm: the base {models.base_path} is itself an adapter (an adapter stage trained on an "
                f"adapter stage); vLLM needs a full model. Export the chain (posttrain export) and serve that, or "
                f"use --backend transformers"
            )
        ranks = [_lora_rank(path) for path in models.adapters.values()]
        lora = {}
        if ranks:
            need = max(ranks)
            lora = dict(enable_lora=True, max_loras=len(ranks),
                        max_lora_rank=next((r for r in _VLLM_LORA_RANKS if r >= need), need))
        self._vllm = vllm
        self.llm = vllm.LLM(model=models.base_path, tokenizer=models.tokenizer_path, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, **lora)
        tokenizer = AutoTokenizer.from_pretrained(models.tokenizer_path)
        config = AutoConfig.from_pretrained(models.base_path).get_text_config()
        engine_config = getattr(self.llm.llm_engine, "model_config", None)  # vLLM's own limit, where it says
        context = getattr(engine_config, "max_model_len", None) or config.max_position_embeddings
        super().__init__(models, tokenizer, context_length=context, vocab_size=config.vocab_size)
        self._lora = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(models.adapters.items())}

    def generate(self, seqs: list[Sequence]) -> None:
        live = [seq for seq in seqs if not seq.cancelled]
        if not live:
            return
        params = [
            self._vllm.SamplingParams(
                n=1,
                temperature=seq.sampling.temperature,
                top_p=seq.sampling.top_p,
                max_tokens=seq.sampling.max_tokens,
                stop=list(seq.sampling.stop) or None,
                stop_token_ids=self.stop_ids,
                seed=None if seq.sampling.seed is None else choice_seed(seq.sampling.seed, seq.index),
            )
            for seq in live
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(seq.prompt_ids)} for seq in live], params,
                                    lora_request=self._lora.get(live[0].adapter), use_tqdm=False)
        for seq, output in zip(live, outputs):
            completion = output.outputs[0]
            seq.completion_tokens = len(completion.token_ids)
            seq.emit(completion.text, "length" if completion.finish_reason == "length" else "stop")


def _lora_rank(adapter_dir: str) -> int:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    return int(config.get("r", 8))
