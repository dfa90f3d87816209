from __future__ import annotations

from posttrain.config import TuningConfig


def apply_lora(model, cfg: TuningConfig, task_type: str = "CAUSAL_LM"):
    """LoRA (Hu et al. 2021) through peft; the base stays frozen and is the reference model when adapters are off.

    ``task_type="SEQ_CLS"`` (reward models) also trains and saves the new score head whole.
    """
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)
