from __future__ import annotations

from posttrain.config import TuningConfig
from posttrain.errors import ConfigError


def embedding_module_names(model) -> list[str]:
    """The leaf names of the input embedding and the output head (once when they are the same module)."""
    wanted = [model.get_input_embeddings()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head is not wanted[0]:
        wanted.append(head)
    names = []
    for module in wanted:
        name = next(n for n, m in model.named_modules() if m is module)
        names.append(name.rsplit(".", 1)[-1])
    return names


def lora_config(model, cfg: TuningConfig, task_type: str):
    """peft's LoraConfig for ``cfg.lora``: LoRA, DoRA, rsLoRA, with the embeddings trained in full if asked."""
    from peft import LoraConfig

    lc = cfg.lora
    extra = {}
    if lc.train_embeddings:
        # Full copies, not LoRA on the embedding: peft 0.21 merges a LoRA on tied embeddings wrongly (the
        # shared matrix gets the update twice), and every later stage here starts from the merged model.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        extra = {"modules_to_save": embedding_module_names(model), "ensure_weight_tying": tied}
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        task_type=task_type,
        **extra,
    )


def apply_lora(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    """LoRA (Hu et al. 2021) through peft; the base stays frozen and is the reference model when adapters are off.

    ``use_dora``: DoRA (Liu et al. 2024); ``use_rslora``: rank-stabilised scaling (Kalajdzievski 2023).
    ``task_type="SEQ_CLS"`` (reward models) also trains and saves the new score head whole.
    """
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(model, cfg, task_type))
    except ValueError as exc:
        # peft targets the fused experts and the router of transformers-v5 MoE models as parameters, which
        # take no dropout; which names it maps there depends on the architecture, so its refusal is translated.
        if "lora_dropout" not in str(exc):
            raise
        raise ConfigError(
            f"tuning.lora.dropout={cfg.lora.dropout:g}: LoRA on this model's {cfg.lora.target_modules} includes "
            f"weights held as parameters (an MoE's fused experts or router) and peft cannot apply dropout to them "
            f"({exc}); set tuning.lora.dropout=0, or target attention only "
            f"(tuning.lora.target_modules=[q_proj, k_proj, v_proj, o_proj])"
        ) from None
