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
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="weight-only quantization (torchao) of the base's linear layers when loaded, for a frozen "
        "base under LoRA on a small device: int8 (CPU or GPU) for training; int4 (CUDA only) cannot train, for "
        "inference only (docs/on-device.md)"
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
    init_from: Name | None = Field(
        None, description="a LoRA adapter folder (same r, alpha and targets) whose weights the adapter starts from, "
        "to keep training it instead of a fresh one (posttrain device train uses it for each new version)"
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


# A task name becomes part of metric names (loss/<task>) and report labels: short, one line, no '/'.
TASK_NAME = re.compile(r"\w[\w .:+-]{0,63}")
TASK_NAME_RULE = "1-64 letters, digits, spaces or '_.:+-', starting with a letter, digit or '_'"
# The methods whose tokenized rows carry a task: per-task metrics, data.mixing and data.replay work for these.
TASK_METHODS = ("pretrain", "sft")


def _check_task_name(name: str | None) -> str | None:
    if name is not None and not TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r} must be {TASK_NAME_RULE}")
    return name


def _as_sources(v: Any) -> Any:
    """A file, a source mapping, or a list of either: the forms a list of data sources may be written in."""
    if isinstance(v, (str, dict)):
        v = [v]
    if isinstance(v, list):
        return [{"path": s} if isinstance(s, str) else s for s in v]
    return v


class DataSource(_Section):
    path: Name
    format: Literal["text", "alpaca", "messages", "preference", "feedback", "prompt", "multitask"] = "messages"
    weight: float = Field(1.0, gt=0, description="sampling weight: 2.0 repeats the file twice, 0.5 takes half")
    role_map: dict[str, str] | None = Field(None, description="ShareGPT 'from' value -> role")
    task: Name | None = Field(
        None, description="the task of every row of this file (a row's own 'task' field is then ignored); "
        "per-task metrics and data.mixing group rows by task (methods pretrain and sft)"
    )

    _task_name = field_validator("task")(_check_task_name)


class MixingConfig(_Section):
    """How each epoch's rows are shared among the tasks (docs/multitask.md)."""

    strategy: Literal["size", "equal", "temperature"] = Field(
        description="size: p_i = n_i / sum n (natural proportions); equal: p_i = 1 / tasks; "
        "temperature: p_i proportional to n_i^(1/T)"
    )
    temperature: float | None = Field(
        None, gt=0, description="T of strategy temperature: 1 is size, larger flattens toward equal (.inf is equal)"
    )

    @model_validator(mode="after")
    def _temperature_fits(self) -> "MixingConfig":
        if self.strategy == "temperature" and self.temperature is None:
            raise ValueError("data.mixing.strategy=temperature needs data.mixing.temperature (e.g. 2.0)")
        if self.strategy != "temperature" and self.temperature is not None:
            raise ValueError(f"data.mixing.temperature is used only with strategy=temperature "
                             f"(given strategy={self.strategy}); remove it or set strategy: temperature")
        return self


class ReplayConfig(_Section):
    """Earlier data mixed into a stage, a fixed share of every epoch (continual learning)."""

    sources: list[DataSource] = Field(
        min_length=1, description="earlier data: files, or an earlier run's folder (the run or its final/; in a "
        "pipeline ${STAGE}) whose data.train is replayed with that run's formats"
    )
    fraction: float = Field(gt=0.0, lt=1.0, description="the share of each epoch's rows drawn from the replay data")

    _sources = field_validator("sources", mode="before")(_as_sources)

    @model_validator(mode="after")
    def _one_task(self) -> "ReplayConfig":
        named = [f"data.replay.sources[{i}]" for i, s in enumerate(self.sources) if s.task is not None]
        if named:
            raise ValueError(f"{', '.join(named)}: task is not used in replay data; every replayed row belongs to "
                             f"the task 'replay' (remove task)")
        return self


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
    mixing: MixingConfig | None = Field(
        None, description="sample each epoch's rows across tasks by size, equally or by temperature; "
        "default: every training row once per epoch"
    )
    replay: ReplayConfig | None = Field(None, description="mix a fraction of earlier data into every epoch")

    _accept_single_source = field_validator("train", "eval", mode="before")(_as_sources)

    @model_validator(mode="after")
    def _weights_or_mixing(self) -> "DataConfig":
        weighted = [f"data.train[{i}].weight={s.weight:g}" for i, s in enumerate(self.train) if s.weight != 1.0]
        if self.mixing is not None and weighted:
            raise ValueError(
                f"{', '.join(weighted)} with data.mixing: a weight repeats a file's rows, and mixing decides each "
                f"task's share itself; give the file its own task (data.train[i].task) and let data.mixing set the "
                f"shares, or drop data.mixing to keep the weights"
            )
        return self


class TrainingConfig(_Section):
    seed: int = 42
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, ge=1, description="samples per micro-batch on each device")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    l2_to_start: float = Field(
        0.0, ge=0, description="coef of (coef/2) * ||theta - theta_start||^2 over the trainable parameters, pulling "
        "them toward their values at the start of the stage (L2-SP; EWC without Fisher); 0: off"
    )
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
    chunked_head: bool = Field(
        True, description="run the LM head on the trained positions only, in checkpointed chunks, so full logits "
        "are never built (SFT, pretraining, DPO/KTO/SimPO/ORPO and their references; distillation's student and "
        "teacher, unchunked; Llama, Qwen, Mistral and similar plain-head architectures); false: one full-logits "
        "forward"
    )

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


DISTILL_MODES = ("logit", "sequence", "on_policy")


class DistillConfig(_Section):
    """Knowledge distillation from a teacher model (docs/distill.md)."""

    teacher: Name | None = Field(
        None, description="the teacher: a model folder (e.g. a run's final/), an adapter folder or a hub id; it "
        "must share the student's tokenizer"
    )
    mode: Literal[DISTILL_MODES] = Field(
        "logit", description="logit: match the teacher's next-token distributions on the data's responses "
        "(Hinton et al. 2015); sequence: SFT on the teacher's own responses to the data's prompts (Kim & Rush "
        "2016); on_policy: match them on the student's own samples (GKD, Agarwal et al. 2024)"
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); "
        "jsd: the generalised Jensen-Shannon divergence with jsd_beta"
    )
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="loss=jsd: the weight beta of the teacher in the mixture")
    temperature: float = Field(
        1.0, gt=0, description="both distributions are softmax(logits / T); the divergence is multiplied by T^2"
    )
    hard_weight: float = Field(
        0.0, ge=0, le=1, description="logit mode: the weight of the NLL of the data's own tokens (at T = 1); "
        "the divergence gets 1 - hard_weight"
    )
    teacher_cache: Literal["live", "topk"] = Field(
        "live", description="live: the teacher scores every batch; topk (logit mode): its top-k log-probs are "
        "computed once and cached beside the tokenized data, keyed by a hash of its weights"
    )
    topk: int | None = Field(
        None, ge=1, description="compare on the teacher's k most likely tokens at each position plus one 'every "
        "other token' category (a lower bound of the full divergence; docs/distill.md); needed by teacher_cache=topk"
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the frozen teacher's weights; auto: bfloat16 on a GPU that supports it, else float32"
    )
    teacher_batch_size: int | None = Field(
        None, ge=1, description="teacher_cache=topk: rows per teacher pass when caching; default 2x "
        "training.batch_size"
    )
    disable_dropout: bool = Field(
        True, description="logit and on_policy: turn dropout off in the student, as the teacher scores without it "
        "(sequence mode trains exactly as method sft, with the model's own dropout)"
    )
    student_fraction: float = Field(
        1.0, ge=0, le=1, description="on_policy: the fraction of steps (lambda in GKD) trained on the student's own "
        "samples; the others use the data's responses"
    )
    teacher_decoding: Literal["greedy", "sample"] = Field(
        "greedy", description="sequence: how the teacher answers; sample uses generation.temperature and top_p"
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="sequence: the teacher's responses; on_policy: the student's samples",
    )

    @model_validator(mode="after")
    def _options_fit_the_mode(self) -> "DistillConfig":
        mode = self.mode
        unused = {
            "logit": {"student_fraction": self.student_fraction != 1.0, "teacher_decoding": self.teacher_decoding
                      != "greedy", "generation": self.generation != GenerationConfig()},
            "sequence": {"loss": self.loss != "forward_kl", "temperature": self.temperature != 1.0,
                         "hard_weight": self.hard_weight != 0.0, "teacher_cache": self.teacher_cache != "live",
                         "topk": self.topk is not None, "student_fraction": self.student_fraction != 1.0,
                         "disable_dropout": not self.disable_dropout},
            "on_policy": {"hard_weight": self.hard_weight != 0.0, "teacher_cache": self.teacher_cache != "live",
                          "teacher_decoding": self.teacher_decoding != "greedy"},
        }[mode]
        given = [f"distill.{name}" for name, set_ in unused.items() if set_]
        if given:
            why = {"logit": "it scores the data's responses and generates nothing",
                   "sequence": "the student is SFT-trained on the teacher's responses, with no divergence and no "
                               "other labels",
                   "on_policy": "the student's samples have no labels and are new every step, so nothing can be "
                                "cached; the teacher is only scored"}[mode]
            raise ValueError(f"{', '.join(given)}: not used by distill.mode={mode} ({why}); remove it")
        if self.jsd_beta != 0.5 and self.loss != "jsd":
            raise ValueError(f"distill.jsd_beta is used only with distill.loss=jsd (given loss={self.loss})")
        if self.teacher_cache == "topk" and self.topk is None:
            raise ValueError("distill.teacher_cache=topk needs distill.topk (e.g. 50): how many of the teacher's "
                             "log-probs to keep per position")
        if self.teacher_batch_size is not None and self.teacher_cache != "topk":
            raise ValueError("distill.teacher_batch_size is used only with distill.teacher_cache=topk (the teacher "
                             "scores the data once, in batches of that size); remove it")
        if self.hard_weight == 1.0:
            raise ValueError("distill.hard_weight=1 trains on the data's own tokens alone and never uses the "
                             "teacher; use method sft, or a hard_weight below 1")
        return self


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


class MoeConfig(_Section):
    """Mixture-of-experts training (docs/moe.md); refused on a dense model unless left at the defaults."""

    aux_loss_coef: float | None = Field(
        None, ge=0, description="weight of the router load-balancing loss (Switch Transformer); default: the "
        "model config's router_aux_loss_coef; 0: off"
    )
    z_loss_coef: float = Field(0.0, ge=0, description="weight of the router z-loss (ST-MoE; 1e-3 in the paper); 0: off")
    aux_loss_scope: Literal["micro_batch", "global_batch"] = Field(
        "micro_batch", description="micro_batch: each micro-batch balances its own tokens; global_batch: expert "
        "loads over the whole global batch (exact under accumulation and DDP; one extra forward pass per step)"
    )
    freeze_router: bool = Field(False, description="the routers' weights (and Qwen2-MoE's shared-expert gates) "
                                "get no gradient and stay bit-identical")
    train_experts: list[int] | None = Field(
        None, min_length=1, description="train only these experts (indices) of every MoE layer; the other "
        "experts' weights stay bit-identical (tuning.mode full or freeze)"
    )
    log_layer_loads: bool = Field(False, description="log each layer's expert loads, not only the summary")

    @field_validator("train_experts")
    @classmethod
    def _expert_indices(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(f"expert indices must be distinct and >= 0; given {v}")
        return v

    def is_default(self) -> bool:
        return self == MoeConfig()


class MemoryConfig(_Section):
    """A resident-memory budget for the training process, e.g. a small device's (docs/on-device.md)."""

    budget_mb: float | None = Field(
        None, gt=0, description="peak resident memory (RSS, MiB) the training process may reach; checked after every "
        "step and at the end (run.json always reports peak_rss_mb)"
    )
    over_budget: Literal["fail", "warn"] = Field(
        "fail", description="fail: stop the run with an error (no final model); warn: log it once and go on"
    )


class FsdpConfig(_Section):
    """FSDP2 (torch's ``fully_shard``): parameters, gradients and optimizer states split over the processes."""

    reshard_after_forward: bool = Field(
        True, description="true: full shard (weights gathered again for the backward; least memory, like ZeRO-3); "
        "false: keep each layer's gathered weights from forward to backward (less communication, like ZeRO-2)"
    )
    cpu_offload: bool = Field(False, description="keep the sharded parameters, gradients and optimizer states in CPU "
                                                 "memory between uses (the optimizer step runs on the CPU)")
    wrap: list[str] | None = Field(
        None, description="module class names sharded as one unit each (default: the model's decoder-layer "
        "classes, transformers' _no_split_modules); the rest is sharded with the root"
    )


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO through ``deepspeed.initialize``; the engine runs the optimizer step and gradient clipping."""

    zero_stage: Literal[1, 2, 3] = Field(
        2, description="1: optimizer states sharded; 2: and gradients; 3: and parameters"
    )
    offload_optimizer: bool = Field(False, description="optimizer states (and the step) in CPU memory (ZeRO-Offload)")
    offload_params: bool = Field(False, description="parameters in CPU memory between uses (ZeRO-3 only)")
    config_file: str | None = Field(
        None, description="a DeepSpeed JSON whose keys are merged over the settings posttrain derives from this "
        "config (batch sizes, accumulation, clipping and precision always come from training:)"
    )

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"distributed.deepspeed.offload_params needs zero_stage 3 (given {self.zero_stage}): "
                             f"only ZeRO-3 shards the parameters")
        return self


class DistributedConfig(_Section):
    """How a run spreads over processes and machines (docs/distributed.md)."""

    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto: DDP when launched on several processes (or what `accelerate launch` was told, "
        "--use_fsdp / --use_deepspeed); ddp: every process holds the whole model; fsdp: FSDP2 sharding; deepspeed: "
        "ZeRO stage 1-3"
    )
    num_processes: int | None = Field(
        None, ge=1, description="processes on this machine; above 1, `posttrain train` tokenizes the data once and "
        "then starts them itself with `accelerate launch` (not needed when you launch it yourself)"
    )
    num_machines: int = Field(1, ge=1, description="machines in the run (each runs `posttrain train` with its rank)")
    machine_rank: int = Field(0, ge=0, description="this machine's rank, 0 on the main machine")
    main_process_ip: str | None = Field(None, description="the main machine's address (multi-machine runs)")
    main_process_port: int | None = Field(None, ge=1, le=65535)
    checkpoint: Literal["full", "sharded"] = Field(
        "full", description="under fsdp/deepspeed, checkpoints always keep the engine's sharded state for resume; "
        "full: each also gets the gathered weights in model/ (loadable by transformers/peft); sharded: only the "
        "shards (faster and smaller; final/ is always gathered)"
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @model_validator(mode="after")
    def _machines_fit(self) -> "DistributedConfig":
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"distributed.machine_rank={self.machine_rank} must be below num_machines="
                             f"{self.num_machines}")
        if self.num_machines > 1 and (self.main_process_ip is None or self.num_processes is None):
            raise ValueError("distributed.num_machines > 1 needs distributed.main_process_ip (the main machine's "
                             "address) and distributed.num_processes (processes per machine)")
        return self


METHODS = ("pretrain", "sft", "reward", "dpo", "kto", "simpo", "orpo", "grpo", "rft", "online_dpo", "ppo", "distill")
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
    distill: DistillConfig = Field(default_factory=DistillConfig)
    moe: MoeConfig = Field(default_factory=MoeConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig | None = None
    output_dir: Name

    @model_validator(mode="after")
    def _quantized_base_fits(self) -> "RunConfig":
        if self.tuning.lora.init_from and self.tuning.mode not in LORA_MODES:
            raise ValueError(f"tuning.lora.init_from starts a LoRA adapter from saved weights; tuning.mode is "
                             f"{self.tuning.mode}: set tuning.mode=lora or remove it")
        q = self.model.quantize
        if q == "none":
            return self
        if q == "int4":
            raise ValueError("model.quantize=int4 cannot train: torchao's int4 (tile-packed) linear layer has no "
                             "backward, so no gradient reaches the LoRA adapters. Use model.quantize=int8, or "
                             "tuning.mode=qlora with model.quantize=none on a GPU")
        if self.tuning.mode != "lora":
            raise ValueError(f"model.quantize={q} quantizes a frozen base under LoRA; tuning.mode={self.tuning.mode} "
                             f"would train or adapt the quantized weights. Set tuning.mode=lora (or, for a 4-bit "
                             f"bitsandbytes base on a GPU, tuning.mode=qlora with model.quantize=none)")
        if self.method == "reward":
            raise ValueError(f"model.quantize={q} cannot be used with method reward: a reward model is saved with its "
                             f"adapter merged into the weights, and merging into quantized weights rounds it")
        engines = [self.online.generation.engine] if self.method in ONLINE_METHODS else []
        if "vllm" in engines:
            raise ValueError(f"model.quantize={q}: online.generation.engine=vllm loads the base's own weights; use "
                             f"engine transformers")
        return self

    @model_validator(mode="after")
    def _moe_fits(self) -> "RunConfig":
        moe = self.moe
        if moe.train_experts is not None:
            if self.tuning.mode not in ("full", "freeze"):
                raise ValueError(
                    f"moe.train_experts needs tuning.mode full or freeze (given {self.tuning.mode}): it holds "
                    f"the other experts' slices of the fused expert weights at zero gradient; with LoRA on the "
                    f"experts every expert gets its low-rank update (see docs/moe.md)"
                )
            if self.training.weight_decay > 0:
                raise ValueError(
                    f"moe.train_experts with training.weight_decay={self.training.weight_decay:g}: every expert "
                    f"of a layer lives in one fused tensor, and AdamW's decay would shrink the frozen experts' "
                    f"slices too; set training.weight_decay=0"
                )
        if self.method in ONLINE_METHODS and (moe.aux_loss_coef or moe.z_loss_coef
                                              or moe.aux_loss_scope != "micro_batch"):
            raise ValueError(
                f"moe.aux_loss_coef / z_loss_coef / aux_loss_scope: the router losses are added by the training "
                f"loop's methods, not yet by the online trainer of method {self.method}; leave them unset "
                f"(freeze_router and train_experts work)"
            )
        return self

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
        if mode in PROMPT_MODES and self.data.packing and method in ("pretrain", "sft", "distill"):
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

    @model_validator(mode="after")
    def _distributed_fits(self) -> "RunConfig":
        d = self.distributed
        if d.strategy in ("fsdp", "deepspeed"):
            problem = self.engine_problem(d.strategy, d.deepspeed.zero_stage)
            if problem:
                raise ValueError(problem)
        return self

    def engine_problem(self, strategy: str, zero_stage: int = 2) -> str | None:
        """Why this run cannot train under FSDP or DeepSpeed (checked at load, and again when ``auto`` resolves)."""
        where = f"distributed.strategy={strategy}" + (f" (ZeRO-{zero_stage})" if strategy == "deepspeed" else "")
        params_sharded = strategy == "fsdp" or zero_stage == 3
        if self.method in ONLINE_METHODS:
            return (f"{where}: method {self.method} generates with the policy between updates, which the online "
                    f"trainer does only with whole weights on every process; use distributed.strategy=ddp")
        if self.method == "distill" and self.distill.mode == "on_policy":
            return (f"{where}: distill.mode=on_policy samples from the student between updates; use "
                    f"distributed.strategy=ddp, or distill.mode logit / sequence")
        if self.tuning.mode in (*PROMPT_MODES, "bottleneck", "qlora"):
            return (f"{where}: tuning.mode={self.tuning.mode} is not supported with sharding (supported: full, "
                    f"freeze, bitfit, lora with or without DoRA, ia3); such small adapters train well with "
                    f"distributed.strategy=ddp")
        if self.training.l2_to_start > 0:
            return (f"{where}: training.l2_to_start adds its gradient to whole, unsharded gradients; "
                    f"use distributed.strategy=ddp")
        if self.moe.train_experts is not None:
            return (f"{where}: moe.train_experts masks gradients of the fused expert tensors, which the engine "
                    f"replaces with shards; use distributed.strategy=ddp or moe.freeze_router")
        if params_sharded and self.eval is not None and self.eval.every_steps:
            return (f"{where}: eval.every_steps runs the eval suites on the main process alone, and sharded "
                    f"weights need every process in each forward; evaluate at the end (eval without every_steps)")
        if self.training.mixed_precision == "fp16":
            return (f"{where}: fp16 loss scaling is not wired for the sharded engines (DeepSpeed's overflow steps "
                    f"would stop the run as non-finite); use training.mixed_precision=bf16")
        if strategy == "deepspeed" and self.training.nan_policy == "skip":
            return (f"{where}: training.nan_policy=skip cannot be honoured, since the engine applies its update "
                    f"before the loss can be checked (fp16 overflow steps are skipped by DeepSpeed's own loss "
                    f"scaler); use training.nan_policy=stop")
        return None

    @model_validator(mode="after")
    def _tasks_fit(self) -> "RunConfig":
        if self.method in TASK_METHODS:
            return self
        data = self.data
        used = [name for name, on in (("data.mixing", data.mixing is not None), ("data.replay", data.replay is not None))
                if on]
        used += [f"data.{part}[{i}].task" for part in ("train", "eval")
                 for i, s in enumerate(getattr(data, part)) if s.task is not None]
        if used:
            raise ValueError(f"{', '.join(used)}: tasks, mixing and replay work on the token rows of methods "
                             f"{' and '.join(TASK_METHODS)}, not method {self.method}; remove them")
        return self

    @model_validator(mode="after")
    def _distill_fits(self) -> "RunConfig":
        d = self.distill
        if self.method != "distill":
            return self
        if not d.teacher:
            raise ValueError("method distill needs distill.teacher: the teacher model's folder, adapter or hub id")
        prompts = [s.format == "prompt" for s in [*self.data.train, *self.data.eval]]
        if d.mode == "logit" and any(prompts):
            raise ValueError("distill.mode=logit scores the data's responses: data files must be messages or alpaca "
                             "rows, not format prompt (for prompts alone use distill.mode=sequence or on_policy)")
        if d.mode == "sequence" and not all(prompts):
            raise ValueError("distill.mode=sequence reads prompts and the teacher writes the responses: every data "
                             "file (train and eval) must have format prompt")
        if d.mode != "on_policy":
            return self
        if any(prompts) and not all(prompts):
            raise ValueError("distill.mode=on_policy: data files must be all format prompt, or all messages/alpaca "
                             "rows (whose prompts are everything before the first trained token)")
        if all(prompts) and d.student_fraction < 1:
            raise ValueError(f"distill.student_fraction={d.student_fraction:g}: the other steps train on the data's "
                             f"responses, and prompt rows have none; use messages or alpaca data, or set it to 1")
        if self.data.packing:
            raise ValueError("data.packing=true cannot be used with distill.mode=on_policy: each row's response is "
                             "replaced by the student's sample, one prompt per row; set data.packing=false")
        if d.generation.engine == "vllm" and self.tuning.mode not in VLLM_MODES:
            raise ValueError(
                f"distill.generation.engine=vllm cannot sample from tuning.mode={self.tuning.mode}: the engine loads "
                f"merged weights under the base model's names ({', '.join(VLLM_MODES)}); use engine transformers or "
                f"auto"
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


def _field_path(loc: tuple, root: type[BaseModel] | None = None) -> str:
    """The dotted field name of an error location, e.g. ``data.train[0].format``.

    Pydantic puts a tag for each member of a union in the location
    (``tuning.lora.target_modules.str``); those are not keys the user wrote, so they are left out.
    ``root`` is the validated model (default ``RunConfig``).
    """
    shown = ""
    ann: Any = root or RunConfig
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


def _format_errors(exc: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    # A value that fits no member of a union gets one error per member: shown as one line.
    by_field: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_field.setdefault(_field_path(err["loc"], root), []).append(err)
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
