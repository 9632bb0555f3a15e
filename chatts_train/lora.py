"""LoRA on ChatTS, with the gradient checkpointing that works under ZeRO-3 on DeepSpeed < 0.19."""
from __future__ import annotations

from .config import TrainConfig
from .modeling import ChatTSForCausalLM


def add_lora(model: ChatTSForCausalLM, cfg: TrainConfig, gradient_checkpointing: bool = True):
    """LoRA on the chosen projections (and optionally the encoder); reentrant checkpointing, which is what
    works with ZeRO-3 and frozen weights on DeepSpeed < 0.19 (non-reentrant crashes in backward)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    model.config.use_cache = False
    targets = "|".join(cfg.lora_target_list)
    pattern = rf"^model\.layers\.\d+\..*\.({targets})$"
    if cfg.lora_encoder:
        pattern += r"|^ts_encoder\.mlp\.\d*[02468]$"  # the Linear layers; odd indices are GELU
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=pattern, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.train_encoder:
        for n, p in model.base_model.model.ts_encoder.named_parameters():
            if "lora_" not in n:
                p.requires_grad_(True)
    return model
