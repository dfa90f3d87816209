"""Typed, nested run config: YAML plus ``section.key=value`` overrides.

Unknown keys are errors (a typo must never be silently ignored) and every error
names the field, the value given and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A path or a name: `output_dir=2024` on the command line parses as a number but means a name.
Name = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)]


class ModelConfig(_Section):
    name_or_path: Name = Field(description="local Hugging Face model directory or hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="a Jinja chat template, or a path to a file holding one; overrides the tokenizer's"
    )


class FreezeConfig(_Section):
    train_top_layers: int | None = Field(None, ge=0, description="train only the top N transformer layers")
    train_modules: list[str] = Field(default_factory=list, description="regexes of parameter names to train")
    train_embeddings: bool = False
    train_lm_head: bool = False


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names")
    use_dora: bool = Field(False, description="DoRA (Liu et al. 2024): a learned magnitude per output row "
                           "and a LoRA update of the direction")
    use_rslora: bool = Field(False, description="rank-stabilised LoRA (Kalajdzievski 2023): scale alpha/sqrt(r), "
                             "not alpha/r")
    train_embeddings: bool = Field(
        False, description="also train the input embedding and the output head in full (peft modules_to_save; "
        "tied embeddings stay tied); saved with the adapter and merged with it"
    )


class QloraConfig(_Section):
    bits: Literal[4, 8] = Field(4, description="4: NF4/FP4 base (QLoRA); 8: LLM.int8() base")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantise the 4-bit quantisation constants too")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class PromptConfig(_Section):
    """Prompt tuning (Lester et al. 2021): soft prompt vectors in front of every input."""

    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["vocab", "random", "text"] = Field(
        "vocab", description="vocab: embeddings of randomly drawn vocabulary tokens; random: N(0, 1) vectors; "
        "text: the embeddings of init_text's tokens (repeated or cut to num_virtual_tokens)"
    )
    init_text: str | None = None

    @model_validator(mode="after")
    def _text_init(self) -> "PromptConfig":
        if self.init == "text" and not self.init_text:
            raise ValueError("tuning.prompt.init=text needs tuning.prompt.init_text")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"tuning.prompt.init_text is used only with init=text (given init={self.init})")
        return self


class PtuningConfig(_Section):
    """P-tuning (Liu et al. 2021, v1): virtual tokens produced by a small encoder, in front of every input."""

    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = Field(None, ge=1, description="default: the model's hidden size")


class PrefixConfig(_Section):
    """Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned keys/values at every layer."""

    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool | None = Field(
        None, description="reparameterise the prefix through a 2-layer MLP while training; "
        "default true for mode prefix, false for ptuning_v2"
    )
    encoder_hidden_size: int | None = Field(None, ge=1, description="the MLP's width; default the model's hidden size")


class Ia3Config(_Section):
    target_modules: list[str] | None = Field(
        None, description="modules whose output (or, for feedforward ones, input) is rescaled; "
        "default: peft's choice for the architecture (Llama: k_proj, v_proj, down_proj)"
    )
    feedforward_modules: list[str] | None = Field(
        None, description="the subset of target_modules scaled on their input; default: peft's (Llama: down_proj)"
    )

    @model_validator(mode="after")
    def _feedforward_subset(self) -> "Ia3Config":
        if self.feedforward_modules and self.target_modules is not None:
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"tuning.ia3.feedforward_modules must be among target_modules; not there: {extra}")
        return self


class BottleneckConfig(_Section):
    """Houlsby et al. (2019) bottleneck adapters: x + up(act(down(x))) after the chosen sublayers of every layer."""

    size: int | None = Field(None, ge=1, description="bottleneck width; default hidden_size // reduction_factor")
    reduction_factor: int = Field(16, ge=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "silu"
    after: list[Literal["attention", "mlp"]] = Field(
        default_factory=lambda: ["attention", "mlp"], min_length=1,
        description="[attention, mlp]: Houlsby; [mlp]: one adapter per layer (Pfeiffer et al. 2021)",
    )

    @field_validator("after")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated entries in {v}")
        return v


TUNING_MODES = ("full", "freeze", "lora", "qlora", "bitfit", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2",
                "bottleneck")
LORA_MODES = ("lora", "qlora")
# peft's prompt-learning methods: nothing in the base changes, so nothing can be merged into it.
PROMPT_MODES = ("prompt", "ptuning", "prefix", "ptuning_v2")
# Those that put virtual tokens in front of the input (prefix tuning puts them in the key/value cache instead).
VIRTUAL_TOKEN_MODES = ("prompt", "ptuning")
# The base stays frozen and the policy with its adapters switched off is the starting model.
ADAPTER_MODES = (*LORA_MODES, "ia3", *PROMPT_MODES, "bottleneck")
# Adapters that cannot be merged into the weights: a run's output stays an adapter over its base.
UNMERGEABLE_MODES = (*PROMPT_MODES, "bottleneck")
# What the vLLM engine can sample from: merged weights under the base model's names.
VLLM_MODES = ("full", "freeze", "bitfit", "lora")


class TuningConfig(_Section):
    mode: Literal[TUNING_MODES] = "full"
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QloraConfig = Field(default_factory=QloraConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    ptuning: PtuningConfig = Field(default_factory=PtuningConfig)
    prefix: PrefixConfig = Field(default_factory=PrefixConfig)
    ia3: Ia3Config = Field(default_factory=Ia3Config)
    bottleneck: BottleneckConfig = Field(default_factory=BottleneckConfig)

    @model_validator(mode="after")
    def _freeze_needs_a_target(self) -> "TuningConfig":
        if self.mode == "freeze" and self.freeze.train_top_layers is None and not self.freeze.train_modules:
            raise ValueError("tuning.mode=freeze needs tuning.freeze.train_top_layers or tuning.freeze.train_modules")
        return self

    @model_validator(mode="after")
    def _prefix_projection(self) -> "TuningConfig":
        if self.mode == "ptuning_v2" and self.prefix.projection:
            raise ValueError("tuning.mode=ptuning_v2 is prefix tuning without the projection; "
                             "for a projected prefix use tuning.mode=prefix")
        if self.mode in ("prefix", "ptuning_v2") and self.prefix.encoder_hidden_size and not self.prefix_projection():
            raise ValueError("tuning.prefix.encoder_hidden_size is the projection's width; "
                             "it needs tuning.prefix.projection=true (mode prefix)")
        return self

    def prefix_projection(self) -> bool:
        """Whether the prefix is reparameterised: the option, else on for prefix and off for ptuning_v2."""
        if self.prefix.projection is not None:
            return self.prefix.projection
        return self.mode == "prefix"


class DataSource(_Section):
    path: Name
    format: Literal["text", "alpaca", "messages", "preference", "feedback", "prompt"] = "messages"
    weight: float = Field(1.0, gt=0, description="sampling weight: 2.0 repeats the file twice, 0.5 takes half")
    role_map: dict[str, str] | None = Field(None, description="ShareGPT 'from' value -> role")


class DataConfig(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = Field(default_factory=list)
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this fraction when no eval file is given")
    max_seq_len: int = Field(1024, ge=8)
    packing: bool = False
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    overlong: Literal["truncate", "drop"] = "truncate"
    max_drop_fraction: float = Field(0.25, ge=0.0, le=1.0)
    cache_dir: str | None = Field(None, description="tokenized-data cache; default: ~/.cache/posttrain/data")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _accept_single_source(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            return [{"path": s} if isinstance(s, str) else s for s in v]
        return v


class TrainingConfig(_Section):
    seed: int = 42
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, ge=1, description="samples per micro-batch on each device")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(3, ge=1, description="checkpoints kept (the best one is always kept)")
    early_stopping_patience: int | None = Field(None, ge=1, description="evaluations without improvement")
    nan_policy: Literal["stop", "skip"] = "stop"
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    progress_bar: bool = True

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> "TrainingConfig":
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("training.early_stopping_patience needs training.eval_steps")
        return self


class DpoConfig(_Section):
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed fraction of flipped labels (sigmoid only)")
    smoothing: Literal["conservative", "robust"] = Field(
        "conservative", description="cDPO (Mitchell 2023) or robust DPO (Chowdhury et al. 2024) label smoothing"
    )
    nll_weight: float = Field(0.0, ge=0.0, description="weight of a per-token NLL term on chosen (RPO)")

    @model_validator(mode="after")
    def _smoothing_is_sigmoid_only(self) -> "DpoConfig":
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing is defined for loss_type=sigmoid only, not {self.loss_type}")
        return self


class KtoConfig(_Section):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U")


class SimpoConfig(_Section):
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(0.5, ge=0.0, description="target reward margin")
    nll_weight: float = Field(0.0, ge=0.0, description="weight of a per-token NLL term on chosen")


class OrpoConfig(_Section):
    lam: float = Field(0.1, gt=0, description="weight of the odds-ratio term (lambda in the paper)")


class RewardConfig(_Section):
    margin_from_score: bool = Field(
        False, description="subtract (score.chosen - score.rejected) * margin_scale inside the sigmoid (Llama 2)"
    )
    margin_scale: float = Field(1.0, gt=0)
    center_weight: float = Field(0.0, ge=0.0, description="weight of (r_chosen + r_rejected)^2, keeps rewards centred")


class PreferenceConfig(_Section):
    reference: Literal["auto", "adapters_off", "precomputed", "live"] = Field(
        "auto",
        description="auto: adapters_off for the adapter modes (LoRA, QLoRA, IA3, prompt/prefix, bottleneck), "
        "precomputed for the others; live holds a frozen copy of the starting model",
    )
    reference_batch_size: int | None = Field(None, ge=1, description="batch for precomputing; default 2x batch_size")
    disable_dropout: bool = Field(
        True, description="turn dropout off in the policy (also for the online methods), as the reference has none"
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    kto: KtoConfig = Field(default_factory=KtoConfig)
    simpo: SimpoConfig = Field(default_factory=SimpoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)


class GenerationConfig(_Section):
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: vLLM when it is installed and a GPU is present, else transformers"
    )
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, ge=1, description="prompts per generate call")


class GrpoConfig(_Section):
    group_size: int = Field(8, ge=2, description="samples per prompt")
    scale_by_std: bool = Field(True, description="false: Dr. GRPO (advantages not divided by the group's std)")
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0, description="DAPO's clip-higher uses e.g. 0.28")
    loss_aggregation: Literal["token", "sequence", "fixed"] = Field(
        "token", description="token: mean over all tokens (DAPO); sequence: per-sequence mean (GRPO); "
        "fixed: sum / (sequences x max_new_tokens) (Dr. GRPO)"
    )
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL term to the reference in the loss")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    drop_equal_groups: bool = Field(False, description="leave out groups whose rewards are all equal (no signal)")
    epochs: int = Field(1, ge=1, description="updates over each rollout batch (mu)")


class RftConfig(_Section):
    samples_per_prompt: int = Field(4, ge=1)
    threshold: float | None = Field(None, description="keep samples with reward >= threshold")
    best_of: bool = Field(True, description="keep only the best sample of each prompt (ties: the first)")
    rounds: int = Field(2, ge=1)
    steps_per_round: int = Field(20, ge=1)


class OnlineDpoConfig(_Section):
    samples_per_prompt: int = Field(2, ge=2, description="the best and the worst sample form the pair")
    beta: float = Field(0.1, gt=0)
    judge: dict | None = Field(
        None, description="a pairwise LLM judge labels the pair instead of the rewards: {base_url, model, rubric}"
    )


class PpoConfig(_Section):
    value_model: Name | None = Field(None, description="the value model's start; default: the policy's start")
    value_learning_rate: float | None = Field(None, gt=0, description="default: training.learning_rate")
    samples_per_prompt: int = Field(1, ge=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["reward", "loss"] = Field("reward", description="a per-token KL penalty in the reward, or a loss term")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0, lt=1)
    value_clip: float | None = Field(0.2, gt=0)
    epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    mini_batches: int = Field(2, ge=1, description="optimizer updates per pass")
    whiten_advantages: bool = True
    whiten_rewards: bool = Field(
        True, description="scale each rollout's scores to mean 0, std 1 (over all processes) before the KL penalty: "
        "kl_coef and value_clip then mean the same for any reward scale (a reward model's scores are arbitrary)"
    )


class OnlineConfig(_Section):
    rewards: list[dict] = Field(default_factory=list, description="e.g. [{type: exact_match, weight: 1.0}]")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    rft: RftConfig = Field(default_factory=RftConfig)
    online_dpo: OnlineDpoConfig = Field(default_factory=OnlineDpoConfig)
    ppo: PpoConfig = Field(default_factory=PpoConfig)


SUITE_TYPES = ("perplexity", "generation", "multiple_choice", "reward_model", "win_rate", "lm_eval")


class EvalSuite(_Section):
    """One evaluation suite; which fields it needs depends on ``type`` (checked below)."""

    name: str = Field(min_length=1, description="the suite's key in eval.json and the report")
    type: Literal[SUITE_TYPES]
    path: Name | None = Field(None, description="the data file (every type but lm_eval)")
    format: str | None = Field(None, description="perplexity: the file's format (default text)")
    scorers: list[dict] = Field(
        default_factory=lambda: [{"type": "exact_match"}],
        description="generation: reward specs (as online.rewards) scoring each answer; the first is the headline",
    )
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1, description="use the first N rows (lm_eval: N per task)")
    batch_size: int = Field(16, ge=1)
    reward_model: Name | None = Field(None, description="reward_model, win_rate: a reward model's final/ folder")
    baseline: Name | None = Field(None, description="win_rate: the model to beat")
    judge: dict | None = Field(None, description="win_rate: a pairwise LLM judge {base_url, model, rubric}")
    tasks: list[str] = Field(default_factory=list, description="lm_eval: task names, e.g. [mmlu, gsm8k]")
    num_fewshot: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _fields_fit_the_type(self) -> "EvalSuite":
        where = f"suite {self.name!r} (type {self.type})"
        if self.type != "lm_eval" and not self.path:
            raise ValueError(f"{where} needs a data file: path")
        if self.type == "lm_eval" and not self.tasks:
            raise ValueError(f"{where} needs tasks, e.g. [gsm8k]")
        if self.type == "reward_model" and not self.reward_model:
            raise ValueError(f"{where} needs reward_model: a reward model's folder")
        if self.type == "win_rate":
            if not self.baseline:
                raise ValueError(f"{where} needs baseline: the model to compare against")
            if (self.judge is None) == (self.reward_model is None):
                raise ValueError(f"{where} needs exactly one of judge or reward_model to decide each pair")
        if self.type == "generation" and not self.scorers:
            raise ValueError(f"{where} needs at least one scorer, e.g. [{{type: exact_match}}]")
        return self


class ForgettingConfig(_Section):
    suite: str = Field(description="the suite on general held-out data (e.g. the pretraining domain's text)")
    threshold: float = Field(0.1, ge=0, description="flag a relative worsening of its headline metric beyond this")


class EvalConfig(_Section):
    suites: list[EvalSuite] = Field(min_length=1)
    before: bool = Field(True, description="also evaluate the starting model, so every number has a before")
    every_steps: int | None = Field(None, ge=1, description="also run the suites every N training steps")
    forgetting: ForgettingConfig | None = None

    @model_validator(mode="after")
    def _names(self) -> "EvalConfig":
        names = [s.name for s in self.suites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval suite names must be unique; repeated: {dupes}")
        if self.forgetting and self.forgetting.suite not in names:
            raise ValueError(f"eval.forgetting.suite {self.forgetting.suite!r} is not a suite; suites: {names}")
        return self


METHODS = ("pretrain", "sft", "reward", "dpo", "kto", "simpo", "orpo", "grpo", "rft", "online_dpo", "ppo")
ONLINE_METHODS = ("grpo", "rft", "online_dpo", "ppo")
REFERENCE_METHODS = ("dpo", "kto", "online_dpo", "grpo", "ppo")


class RunConfig(_Section):
    model: ModelConfig
    method: Literal[METHODS]
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    eval: EvalConfig | None = None
    output_dir: Name

    @model_validator(mode="after")
    def _reference_fits(self) -> "RunConfig":
        if self.eval is not None and self.method == "reward":
            raise ValueError("eval: a reward model is no generator; score pairs with `posttrain score` instead")
        ref = self.preference.reference
        if self.method in ONLINE_METHODS:
            if not self.online.rewards and not (self.method == "online_dpo" and self.online.online_dpo.judge):
                raise ValueError(f"method {self.method} needs online.rewards (e.g. [{{type: exact_match}}])")
            odpo = self.online.online_dpo
            if self.method == "online_dpo" and odpo.judge and odpo.samples_per_prompt != 2:
                raise ValueError("online.online_dpo.judge compares two samples: set online.online_dpo.samples_per_prompt=2")
            if ref == "precomputed":
                raise ValueError("preference.reference=precomputed: online samples are new every step; use live")
        if ref == "auto":
            return self
        if self.reference_mode() is None:
            raise ValueError(
                f"preference.reference={ref}: method {self.method} uses no reference model; leave it at auto"
            )
        if ref == "adapters_off" and self.tuning.mode not in ADAPTER_MODES:
            raise ValueError(
                f"preference.reference=adapters_off needs tuning.mode=lora or another mode that keeps the base "
                f"frozen under adapters ({', '.join(ADAPTER_MODES[1:])}); given {self.tuning.mode}. "
                f"Use precomputed or live"
            )
        if ref == "adapters_off" and self.starts_from_kept_adapter():
            raise ValueError(
                f"preference.reference=adapters_off: model.name_or_path={self.model.name_or_path!r} is a "
                f"{self.starts_from_kept_adapter()} adapter, which stays an adapter when loaded; with it off the "
                f"reference would be its bare base, not the starting model. Use precomputed or live"
            )
        return self

    @model_validator(mode="after")
    def _tuning_fits(self) -> "RunConfig":
        """Combinations of tuning mode and method that cannot work, refused with the reason."""
        mode, method = self.tuning.mode, self.method
        if mode in PROMPT_MODES and self.data.packing and method in ("pretrain", "sft"):
            how = ("adds its virtual tokens once per row, before the first sample only, and positions and attention "
                   "run on across the samples" if mode in VIRTUAL_TOKEN_MODES else
                   "puts its prefix in the key/value cache, and with a cache transformers does not build the mask "
                   "that keeps packed samples apart")
            raise ValueError(f"data.packing=true cannot be used with tuning.mode={mode} (method {method}): "
                             f"{mode} {how}; set data.packing=false")
        if mode in ("prefix", "ptuning_v2") and self.training.gradient_checkpointing:
            raise ValueError(
                f"training.gradient_checkpointing=true cannot be used with tuning.mode={mode}: transformers drops "
                f"the key/value cache inside checkpointed layers, and the prefix lives in it"
            )
        if method == "reward" and (mode in UNMERGEABLE_MODES or mode == "qlora"):
            why = ("merging into the 4-bit base would save a quantised, rounded model; use tuning.mode=lora"
                   if mode == "qlora" else f"{mode} adapters cannot be merged into the weights")
            raise ValueError(
                f"method reward cannot use tuning.mode={mode}: a reward model is saved as a whole "
                f"AutoModelForSequenceClassification with its adapter merged (posttrain score, PPO and the eval "
                f"suites load it anywhere), and {why}"
            )
        if method in ONLINE_METHODS and self.online.generation.engine == "vllm" and mode not in VLLM_MODES:
            raise ValueError(
                f"online.generation.engine=vllm cannot sample from tuning.mode={mode} (method {method}): the engine "
                f"loads merged weights under the base model's names ({', '.join(VLLM_MODES)}); "
                f"use engine transformers or auto"
            )
        return self

    def starts_from_kept_adapter(self) -> str | None:
        """The kind of adapter at model.name_or_path when it is one that loading keeps unmerged, else None."""
        from posttrain.tuning.kept import kept_adapter_kind

        return kept_adapter_kind(self.model.name_or_path)

    def reference_mode(self) -> str | None:
        """How the reference log-probs are obtained, or None for methods that use none."""
        no_kl = (self.method == "grpo" and self.online.grpo.kl_coef == 0) or (
            self.method == "ppo" and self.online.ppo.kl_coef == 0
        )
        if self.method not in REFERENCE_METHODS or no_kl:
            return None
        if self.preference.reference != "auto":
            return self.preference.reference
        if self.tuning.mode in ADAPTER_MODES and not self.starts_from_kept_adapter():
            return "adapters_off"
        # Online samples are new every step, so their reference log-probs cannot be computed in advance.
        return "live" if self.method in ONLINE_METHODS else "precomputed"


def _describe_allowed(err: dict) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    if err["type"] == "value_error" and "error" in ctx:
        return str(ctx["error"])  # our own validators' message, without pydantic's "Value error, " prefix
    return err["msg"]


def _without_none(ann: Any) -> Any:
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _field_path(loc: tuple) -> str:
    """The dotted field name of an error location, e.g. ``data.train[0].format``.

    Pydantic puts a tag for each member of a union in the location
    (``tuning.lora.target_modules.str``); those are not keys the user wrote, so they are left out.
    """
    shown = ""
    ann: Any = RunConfig
    for part in loc:
        ann = _without_none(ann)
        if isinstance(part, int):
            shown += f"[{part}]"
            args = get_args(ann)
            ann = args[0] if args else None
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(part)
            ann = field.annotation if field is not None else None
        elif get_origin(ann) in (Union, UnionType):
            ann = None  # a union member's tag
            continue
        elif get_origin(ann) is dict:
            args = get_args(ann)
            ann = args[1] if args else None
        else:
            ann = None
        shown += f".{part}" if shown else str(part)
    return shown


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    # A value that fits no member of a union gets one error per member: shown as one line.
    by_field: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_field.setdefault(_field_path(err["loc"]), []).append(err)
    for loc, errs in by_field.items():
        err = errs[0]
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (given {given!r}); check the spelling")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required, not given")
        else:
            allowed = " or ".join(dict.fromkeys(_describe_allowed(e) for e in errs))
            shown = "" if isinstance(given, dict) else f"given {given!r}; "
            # A check across sections has no single field; its message names the fields itself.
            lines.append(f"  {loc}: {shown}{allowed}" if loc else f"  {allowed}")
    return "\n".join(lines)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but 1e-4 is a float: YAML 1.1 wants a dot (1.0e-4) and reads 1e-4 as a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_value(text: str) -> Any:
    """Parse an override's value with YAML rules, so 1e-4, true, [a, b] mean what they look like."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, raw: dict | None = None,
                base_dir: str | Path | None = None) -> RunConfig:
    """Load, override and validate a run config.

    A relative data path is taken from the working directory, or from the config's folder (or
    ``base_dir``) when it is not found there (so recipes run from anywhere).
    """
    raw = copy.deepcopy(raw or {})  # overrides write into nested sections: never into the caller's dict
    if path is not None:
        raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    source = str(path) if path is not None else "config"
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    if path is not None or base_dir is not None:
        base = Path(base_dir) if base_dir is not None else Path(path).resolve().parent
        for src in [*cfg.data.train, *cfg.data.eval]:
            if not Path(src.path).is_absolute() and not Path(src.path).exists() and (base / src.path).exists():
                src.path = str(base / src.path)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
