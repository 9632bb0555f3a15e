"""Model and DeepSpeed engine set-up: the DeepSpeed config, the model built under ZeRO-3 so no rank holds
all of it, LoRA, the optimizer and schedule, and the checks that fp16 loss scaling is really active."""
from __future__ import annotations

import copy
import json
import math
from typing import Optional

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig
from transformers.modeling_utils import no_init_weights

from .config import TrainConfig
from .errors import TrainingError
from .modeling import ChatTSConfig, ChatTSForCausalLM, load_model, pick_attention

OFFLOAD_CHOICES = ("none", "param", "optimizer", "all")


def load_ds_config(path: str, world_size: int, micro_batch: Optional[int] = None, grad_accum: Optional[int] = None,
                   fp16: Optional[bool] = None, offload: Optional[str] = None) -> dict:
    """Read the DeepSpeed JSON and apply the run's overrides; batch sizes always add up."""
    with open(path) as f:
        ds = json.load(f)
    ds = copy.deepcopy(ds)
    mb = micro_batch or _int(ds.get("train_micro_batch_size_per_gpu"), 1)
    ga = grad_accum or _int(ds.get("gradient_accumulation_steps"), 1)
    ds.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga, train_batch_size=mb * ga * world_size)
    if fp16 is not None:
        ds.setdefault("fp16", {})["enabled"] = fp16
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise TrainingError(f"{path}: fp16 and bf16 are both enabled; pick one")
    zero = ds.setdefault("zero_optimization", {})
    if offload is not None:
        if offload not in OFFLOAD_CHOICES:
            raise TrainingError(f"--offload {offload!r}: choose one of {', '.join(OFFLOAD_CHOICES)}")
        zero.pop("offload_param", None)
        zero.pop("offload_optimizer", None)
        if offload in ("param", "all"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.get("offload_param") and zero.get("stage") != 3:
        raise TrainingError(f"{path}: offload_param needs ZeRO stage 3")
    return ds


def _int(v, default: int) -> int:
    return default if v in (None, "auto") else int(v)


def precision(ds: dict) -> torch.dtype:
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32


class _Completed:
    """Handle of a collective that already finished."""

    def wait(self) -> None:
        pass


def blocking_gathers_on_cpu() -> None:
    """DeepSpeed 0.18 launches several async all-gathers and waits only for the last one ("ordered on the
    CUDA stream"). With gloo on the CPU accelerator they are not ordered, and ZeRO-3 then reads half-gathered
    weights: seen here as NaN or random weights after loading and run-to-run different losses. On the CPU
    we make those gathers blocking; GPUs are left alone."""
    import deepspeed.comm as dcomm
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or getattr(dcomm, "_chatts_blocking", False):
        return
    for name in ("all_gather", "all_gather_into_tensor"):
        original = getattr(dcomm, name)

        def blocking(*args, _original=original, async_op=False, **kwargs):
            handle = _original(*args, async_op=False, **kwargs)
            return (handle or _Completed()) if async_op else handle

        setattr(dcomm, name, blocking)
    dcomm._chatts_blocking = True


def build_model(model_path: Optional[str], ds: dict, attn_implementation: Optional[str] = None,
                config: Optional[ChatTSConfig] = None) -> tuple[ChatTSForCausalLM, Optional[HfDeepSpeedConfig]]:
    """The ChatTS model in the run's dtype; under ZeRO-3 built inside `zero.Init` (each rank materialises
    only its shard). With `config` and no path, the shape alone, without weights or random init (for
    memory and speed probes: values do not matter there).

    Keep the returned `HfDeepSpeedConfig` alive as long as the model: transformers holds it by weakref."""
    dtype = precision(ds)
    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    blocking_gathers_on_cpu()
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None
    attn = pick_attention(attn_implementation)
    if config is None:
        return load_model(model_path, dtype=dtype, attn_implementation=attn), hf_ds
    config._attn_implementation = attn
    with no_init_weights():
        if zero3:
            with deepspeed.zero.Init(config_dict_or_path=ds, dtype=dtype):
                model = ChatTSForCausalLM(config)
        else:
            model = ChatTSForCausalLM(config).to(dtype)
    return model, hf_ds


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


def build_engine(model, ds: dict, cfg: TrainConfig, total_steps: int):
    """`deepspeed.initialize` with AdamW (CPU Adam when the optimizer is offloaded) and warmup + cosine."""
    dtype = precision(ds)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            # PEFT leaves LoRA weights in fp32 under zero.Init; in fp16 the ZeRO-3 optimizer would then build
            # a static loss scaler of 1.0 and no scaling happens. fp16 weights give fp32 masters + a dynamic scaler.
            p.data = p.data.to(dtype)
    encoder = [p for n, p in model.named_parameters() if p.requires_grad and ".ts_encoder." in n and "lora_" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (".ts_encoder." in n and "lora_" not in n)]
    groups = [{"params": rest, "lr": cfg.learning_rate}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.encoder_lr or cfg.learning_rate})
    if ds["zero_optimization"].get("offload_optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    check_loss_scaling(engine)
    return engine


def check_loss_scaling(engine) -> None:
    """Refuse to train fp16 without a dynamic loss scaler: it would silently underflow gradients."""
    if not engine.fp16_enabled():
        return
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if type(scaler).__name__ != "DynamicLossScaler":
        raise TrainingError(
            f"fp16 is on but the loss scaler is {type(scaler).__name__} (scale {loss_scale(engine)}), not dynamic. "
            "Set fp16.loss_scale to 0 in the DeepSpeed config, and keep trainable weights in fp16.")


def loss_scale(engine) -> float:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(getattr(scaler, "cur_scale", getattr(scaler, "loss_scale", 1.0))) if scaler else 1.0
