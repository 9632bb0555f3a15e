"""LoRA on ChatTS, with the gradient checkpointing that works under ZeRO-3 on DeepSpeed < 0.19."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .config import TrainConfig
from ..model.modeling import ChatTSForCausalLM


def add_lora(model: ChatTSForCausalLM, cfg: TrainConfig, recompute_layers: Optional[int] = None,
             checkpoints_on_cpu: bool = False, inputs_require_grad: bool = False):
    """LoRA on the chosen projections (and optionally the encoder). The first `recompute_layers` decoder
    layers (default: all) are recomputed in backward with reentrant checkpointing, which is what works with
    ZeRO-3 and frozen weights on DeepSpeed < 0.19 (non-reentrant crashes in backward); the others keep their
    activations. The first ones, because then the kept layers' backward frees their activations before any
    recompute starts: the peak holds one layer's activations less than with the last ones recomputed.
    `checkpoints_on_cpu`: the recomputed layers' inputs wait for the backward in pinned host memory.
    `inputs_require_grad`: the first layer's input requires grad even with no layer recomputed (compiled
    layers: then one graph serves all of them, RESULTS.md "One graph for every layer and length")."""
    from peft import LoraConfig, get_peft_model

    layers = model.model.layers
    k = len(layers) if recompute_layers is None else min(recompute_layers, len(layers))
    if k:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        for layer in layers[k:]:
            layer.gradient_checkpointing = False
        if checkpoints_on_cpu:
            for layer in layers[:k]:
                layer._gradient_checkpointing_func = partial(_checkpoint_to_host, checkpoint=layer._gradient_checkpointing_func)
    if k or inputs_require_grad:
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad; compiled layers one graph
    model.checkpoints_on_cpu = bool(k and checkpoints_on_cpu)
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


def _checkpoint_to_host(function, *args, checkpoint):
    """A reentrant checkpoint runs its layer without autograd, so what autograd saves inside this is the
    layer's input alone: on the host. The recompute in backward runs outside it, on the GPU."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args)
