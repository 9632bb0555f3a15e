"""Model and DeepSpeed engine set-up: the DeepSpeed config, the model built under ZeRO-3 so no rank holds
all of it, LoRA, the optimizer and schedule, and the checks that fp16 loss scaling is really active."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig
from transformers.modeling_utils import no_init_weights

from .config import TrainConfig
from .errors import TrainingError
from .hostmem import partitions_pinned_in_chunks
from .modeling import ChatTSConfig, ChatTSForCausalLM, check_checkpoint, load_model, pick_attention
from .weights import load_into_partitions

OFFLOAD_CHOICES = ("none", "param", "optimizer", "all")


def init_process(seed: int, gpu_memory_cap_gib: Optional[float] = None) -> tuple[int, int, torch.device]:
    """Process group, this rank's device, seeds; returns (rank, world, device). Shared by train() and memprobe."""
    # Before the first CUDA allocation: without it ZeRO-3's changing gather sizes fragment the cache by GBs
    # (measured: 14B at 4096 tokens OOMs under a 22 GiB cap without it, fits with it; benchmarks/RESULTS.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if gpu_memory_cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_cap_gib * 1024 ** 3 / total), device)
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    return rank, world, device


def read_ds_config(path: str) -> dict:
    """The DeepSpeed JSON as it is on disk, or a one-line error saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise TrainingError(f"--ds_config {path}: no such file (the project ships ds_config.json in its root)")
    try:
        with open(path) as f:
            ds = json.load(f)
    except ValueError as e:
        raise TrainingError(f"--ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise TrainingError(f"--ds_config {path}: expected a JSON object, found {type(ds).__name__}")
    return ds


def load_ds_config(path: str, world_size: int, micro_batch: Optional[int] = None, grad_accum: Optional[int] = None,
                   fp16: Optional[bool] = None, offload: Optional[str] = None) -> dict:
    """Read the DeepSpeed JSON and apply the run's overrides; batch sizes always add up."""
    ds = read_ds_config(path)
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
    """The ChatTS model in the run's dtype. Under ZeRO-3 it is built inside `zero.Init` (each rank
    materialises only its partition) and each rank reads its partition straight from the checkpoint
    (`weights.py`). With `config` (the path is then unused): the shape alone, filled with small random values
    (memory and speed probes: values do not matter there, NaNs from uninitialised memory would).

    Keep the returned `HfDeepSpeedConfig` alive as long as the model: transformers holds it by weakref."""
    dtype = precision(ds)
    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    blocking_gathers_on_cpu()
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None
    attn = pick_attention(attn_implementation)
    shape_only = config is not None
    if not shape_only and not zero3:
        return load_model(model_path, dtype=dtype, attn_implementation=attn), hf_ds
    if not shape_only:
        config = check_checkpoint(model_path)
    config._attn_implementation = attn
    with no_init_weights():
        if zero3:
            # No dtype argument: DeepSpeed 0.18 then takes it from the config (fp16 / bf16 / fp32), whereas an
            # explicit one is ignored on accelerators without fp16 (the CPU: bf16 instead of fp32).
            with partitions_pinned_in_chunks(), deepspeed.zero.Init(config_dict_or_path=ds):
                model = ChatTSForCausalLM(config)
        else:
            model = ChatTSForCausalLM(config).to(dtype)
    if shape_only:
        fill_random(model)
    else:
        load_into_partitions(model, model_path)
    return model, hf_ds


def fill_random(model: torch.nn.Module) -> None:
    """Small random values, cheaply: each rank fills only its own ZeRO-3 partition, where it lives."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if n.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.uniform_(-0.02, 0.02)


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
    schedule = warmup_cosine(int(cfg.warmup_ratio * total_steps), total_steps, cfg.min_lr_ratio)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    check_loss_scaling(engine)
    return engine


def warmup_cosine(warmup: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warmup, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def prepare_engine(cfg: TrainConfig, ds: dict, total_steps: int, shape: Optional[ChatTSConfig] = None):
    """The one way a training engine is made: `train()`, `benchmarks/memprobe.py` and custom loops all call
    it, so what is measured is what runs. Model loaded from `cfg.model_path` (or, with `shape`, built from
    config alone), LoRA with reentrant checkpointing, trainable weights in the run's dtype, DeepSpeed engine
    with a checked loss scaler, and training mode: `from_pretrained` returns eval mode, and in eval mode
    transformers silently skips gradient checkpointing (measured on 14B: 40 GiB instead of 7 GiB per GPU).

    Returns (engine, hf_ds); keep hf_ds alive as long as the engine."""
    model, hf_ds = build_model(None if shape is not None else cfg.model_path, ds, cfg.attn_implementation, config=shape)
    engine = build_engine(add_lora(model, cfg, cfg.gradient_checkpointing), ds, cfg, total_steps)
    engine.train()
    return engine, hf_ds


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Qwen2DecoderLayer"]


def check_training_mode(model: torch.nn.Module) -> None:
    """Refuse a training step in eval mode: transformers then skips gradient checkpointing without a word,
    and the step needs ~5x the activation memory (an OOM on a 22 GB card)."""
    if not model.training or not all(m.training for m in decoder_layers(model)):
        raise TrainingError("a training step was asked for with the model in eval mode, where transformers skips "
                            "gradient checkpointing (~5x the memory): call engine.train() after loading or "
                            "evaluating, before the next micro-step")


def describe_setup(engine) -> dict:
    """What the training step will run with, for comparing set-ups (train() vs memprobe) and the run record."""
    model = engine.module
    layers = decoder_layers(model)
    trainable = {n: str(p.dtype) for n, p in model.named_parameters() if p.requires_grad}
    frozen = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    return {
        "training": model.training and all(m.training for m in layers),
        "decoder_layers": len(layers),
        "checkpointed_layers": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in layers),
        "checkpointing_reentrant": _reentrant(model),
        "input_requires_grad_hook": getattr(model.get_base_model(), "_require_grads_hook", None) is not None,
        "attention": model.config._attn_implementation,
        "frozen_dtypes": frozen,
        "trainable": trainable,
        "trainable_numel": int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)),
        "zero_stage": engine.zero_optimization_stage(),
        "offload_param": bool(engine.zero_offload_param()) if engine.zero_optimization_stage() == 3 else False,
        "loss_scaler": type(getattr(engine.optimizer, "loss_scaler", None)).__name__,
    }


def _reentrant(model) -> Optional[bool]:
    fn = next((m._gradient_checkpointing_func for m in decoder_layers(model)
               if hasattr(m, "_gradient_checkpointing_func")), None)
    return None if fn is None else bool(getattr(fn, "keywords", {}).get("use_reentrant"))


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
