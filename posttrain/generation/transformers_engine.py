"""Generation with transformers' own ``model.generate``: CPU or one GPU, any causal LM, peft or not.

Log-probs come from the raw logits of each step (``output_logits``), divided by the
temperature, never from the processed scores: after top-p those hold -inf for the
tokens cut away and are renormalised over the nucleus. Raw logits are kept for a
whole batch (batch x new tokens x vocabulary floats), which ``batch_size`` bounds.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from posttrain.errors import PosttrainError
from posttrain.generation.base import Generation, SamplingParams

# transformers fills every generation setting left at None from the model's
# generation_config, so a checkpoint's repetition_penalty=1.05 or top_k=20 would change
# what is sampled without changing the log-probs reported. Such settings are overridden
# with these values, which leave the distribution alone; the sampling-only ones matter
# only when sampling. Only settings the model actually changes are overridden, which
# keeps transformers from adding no-op processors and warning about them.
_NEUTRAL_ALWAYS = dict(
    num_beams=1,
    num_return_sequences=1,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    min_length=0,
    min_new_tokens=0,
    guidance_scale=1.0,
    remove_invalid_values=False,
    renormalize_logits=False,
)
_NEUTRAL_WHEN_SAMPLING = dict(min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
# These change the distribution and cannot be switched off from a call: they must be unset.
_ONLY_UNSET_AT_SOURCE = (
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "watermarking_config",
    "top_h",
)


class TransformersEngine:
    """Samples from ``model`` itself, so the policy and the sampler never differ in weights."""

    def __init__(self, model, tokenizer, *, stop_token_ids: list[int], batch_size: int = 32):
        if not stop_token_ids:
            raise ValueError("stop_token_ids must name at least one token (e.g. the end-of-turn token)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.batch_size = batch_size
        # Any id will do for padding: padded positions are masked and tokens after a stop are dropped.
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]

    def sync_weights(self, model) -> None:
        """Nothing to do: this engine samples from the policy module itself."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` completions for each prompt (token ids), in prompt order."""
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        self._refuse_distribution_changes()
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]
        results: list[list[Generation]] = [[] for _ in prompts]
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad(), _seeded(params.seed):
                for batch in self._batches(rows, prompts):
                    for index, generation in zip(batch, self._generate_batch([prompts[i] for i in batch], params)):
                        generation.prompt_index = index
                        results[index].append(generation)
        finally:
            for module, training in modes.items():
                module.training = training
        return results

    def _batches(self, rows: list[int], prompts: list[list[int]]) -> list[list[int]]:
        """Rows in batches of at most ``batch_size``; prompts of one length together for virtual-token models.

        peft ignores position ids when it puts virtual tokens (prompt tuning, P-tuning) in front of
        the input, so left padding would shift every prompt token's position by the padding and the
        sampled tokens would not follow the log-probs the trainer computes on unpadded rows.
        """
        from posttrain.tuning.prompt import has_virtual_tokens

        groups = [rows]
        if has_virtual_tokens(self.model):
            by_length: dict[int, list[int]] = {}
            for i in rows:
                by_length.setdefault(len(prompts[i]), []).append(i)
            groups = list(by_length.values())
        return [g[start : start + self.batch_size] for g in groups for start in range(0, len(g), self.batch_size)]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            # Left padding: every row's next token is predicted at the same (last) column.
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(params),
        )
        new_tokens = out.sequences[:, width:].cpu()
        temperature = 1.0 if params.greedy else params.temperature
        logprobs = torch.stack(
            [
                torch.log_softmax(step.float() / temperature, dim=-1).gather(-1, new_tokens[:, k, None].to(step.device))
                for k, step in enumerate(out.logits)
            ],
            dim=1,
        ).squeeze(-1).cpu()
        return [self._finish(new_tokens[row].tolist(), logprobs[row].tolist()) for row in range(len(prompts))]

    def _finish(self, tokens: list[int], logprobs: list[float]) -> Generation:
        stops = set(self.stop_token_ids)
        end = next((k for k, token in enumerate(tokens) if token in stops), None)
        if end is None:
            ids, reason, text_ids = tokens, "length", tokens
        else:
            # What follows a row's stop token is padding, added while other rows went on.
            ids, reason, text_ids = tokens[: end + 1], "stop", tokens[:end]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        return Generation(-1, ids, logprobs[: len(ids)], text, reason)

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        if params.greedy:
            settings = dict(do_sample=False, **_overrides(self.model, _NEUTRAL_ALWAYS))
        else:
            # top_k is not a model-only setting: transformers' own default is 50, hence always 0 here.
            settings = dict(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                **_overrides(self.model, {**_NEUTRAL_ALWAYS, **_NEUTRAL_WHEN_SAMPLING}),
            )
        return GenerationConfig(
            **settings,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )

    def _refuse_distribution_changes(self) -> None:
        config = getattr(self.model, "generation_config", None)
        set_fields = [name for name in _ONLY_UNSET_AT_SOURCE if getattr(config, name, None) is not None]
        if set_fields:
            raise PosttrainError(
                f"the model's generation_config sets {', '.join(set_fields)}, which would change the tokens "
                "sampled for training without showing in their log-probs; set them to None in "
                "model.generation_config (or generation_config.json) before online training"
            )


def _overrides(model, neutral: dict) -> dict:
    """The neutral values of the settings that ``model``'s generation_config sets otherwise."""
    config = getattr(model, "generation_config", None)
    return {name: value for name, value in neutral.items() if getattr(config, name, None) not in (None, value)}


@contextmanager
def _seeded(seed: int | None):
    """Seeds torch's global RNG for one call and puts the previous state back afterwards.

    With no seed it does nothing: sampling then draws from (and advances) the global RNG.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield
