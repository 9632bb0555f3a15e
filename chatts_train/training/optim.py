"""Optimizer parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, cpu_adam: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; the fully trained encoder (not its LoRA) gets `encoder_lr`. With
    the optimizer offloaded, DeepSpeed's CPU Adam (compiled on first use)."""
    is_encoder = lambda n: ".ts_encoder." in n and "lora_" not in n  # noqa: E731
    encoder = [p for n, p in model.named_parameters() if p.requires_grad and is_encoder(n)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not is_encoder(n)]
    groups = [{"params": rest, "lr": cfg.learning_rate}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.learning_rate if cfg.encoder_lr is None else cfg.encoder_lr})
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def warmup_cosine(warmup: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warmup, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
