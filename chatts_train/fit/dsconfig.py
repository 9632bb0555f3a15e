"""The DeepSpeed config of a run: the JSON file, checked, with the run's overrides applied."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import TrainingError, read_json_object

OFFLOAD_CHOICES = ("none", "param", "optimizer", "all")


def read_ds_config(path: str) -> dict:
    """The DeepSpeed JSON as it is on disk, or a one-line error saying what is wrong with the file."""
    return read_json_object(path, TrainingError, f"--ds_config {path}: no such file (the project ships "
                            f"ds_config.json in its root)", "fix it or pass another --ds_config")


def load_ds_config(path: str, world_size: int, micro_batch: Optional[int] = None, grad_accum: Optional[int] = None,
                   fp16: Optional[bool] = None, offload: Optional[str] = None,
                   autos: Optional[dict] = None, bf16: Optional[bool] = None) -> dict:
    """The run's DeepSpeed config: the JSON with the run's overrides (micro-batch, accumulation, fp16,
    offload) applied, so the batch sizes always add up, and every other "auto" value (as transformers'
    Trainer writes them in its files: LLaMA-Factory's, ChatTS-Training's) replaced by `autos`, the run's own
    values by dotted key (`trainer_autos`). The one place where the file and the run meet; every problem found
    is reported at once."""
    ds = read_ds_config(path)
    problems = resolve_autos(ds, autos or {})
    sizes = {}
    for key, override in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", grad_accum)):
        value = ds.get(key)
        value = override if override is not None else (1 if value in (None, "auto") else value)  # "auto": ours
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key} must be a positive integer, got {value!r}")
            value = 1
        sizes[key] = value
    ds.update(sizes, train_batch_size=sizes["train_micro_batch_size_per_gpu"]
              * sizes["gradient_accumulation_steps"] * world_size)
    if fp16 is not None:
        ds.setdefault("fp16", {})["enabled"] = fp16
    if bf16 is not None:
        ds.setdefault("bf16", {})["enabled"] = bf16
        if bf16 and fp16 is None:
            ds.setdefault("fp16", {})["enabled"] = False
    # the run's own optimizer (AdamW) and warmup + cosine schedule are what deepspeed.initialize gets
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        problems.append("fp16 and bf16 are both enabled; pick one")
    zero = ds.setdefault("zero_optimization", {})
    if offload is not None and offload not in OFFLOAD_CHOICES:
        problems.append(f"--offload {offload!r}: choose one of {', '.join(OFFLOAD_CHOICES)}")
    elif offload is not None:
        zero.pop("offload_param", None)
        zero.pop("offload_optimizer", None)
        if offload in ("param", "all"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    # DeepSpeed's default swaps F.linear for a function that keeps every Linear's input for backward; with
    # frozen base weights only LoRA's inputs are needed, and torch's own linear keeps just those (~0.2 GiB
    # less kept per recomputed 14B layer at 4,096 tokens). A config that sets it keeps its choice.
    zero.setdefault("memory_efficient_linear", False)
    if zero.get("offload_param") and zero.get("stage") not in (None, "auto", 3):
        problems.append("offload_param needs ZeRO stage 3")
    if problems:
        raise TrainingError(f"DeepSpeed config {path}: " + "; ".join(problems))
    return ds


# Batch sizes and accumulation: the run's (above); the rest as transformers' Trainer resolves them.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def trainer_autos(learning_rate: float, weight_decay: float, hidden_size: int, half: Optional[torch.dtype]) -> dict:
    """What each "auto" of a Trainer-style DeepSpeed file means for this run, by dotted key: clipping at 1.0
    (the Trainer's max_grad_norm), the precision the card runs (`half`: fp16, bf16, or None for fp32 on the
    CPU), ZeRO's buckets from the hidden size as the Trainer sizes them, optimizer and scheduler values from
    the run's own (those sections are then replaced by the run's optimizer and schedule)."""
    return {"gradient_clipping": 1.0,
            "fp16.enabled": half == torch.float16, "bf16.enabled": half == torch.bfloat16,
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
            "optimizer.params.lr": learning_rate, "optimizer.params.weight_decay": weight_decay,
            "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
            "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": learning_rate,
            "scheduler.params.warmup_num_steps": 0, "scheduler.params.total_num_steps": 0}


def resolve_autos(ds: dict, autos: dict) -> list[str]:
    """Replace, in place, every "auto" value of `ds` by autos[its dotted key]; one problem line per key left
    unresolved (the batch sizes are resolved by load_ds_config itself)."""
    problems = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif value == "auto" and name not in BATCH_KEYS:
                if name in autos:
                    node[key] = autos[name]
                else:
                    problems.append(f'`{name}` is "auto" and this run has nothing to resolve it to: give it a value')

    walk(ds, "")
    return problems


def run_precision(fp16: Optional[bool], bf16: Optional[bool] = None, card: str = "auto") -> Optional[torch.dtype]:
    """The precision "auto" means here: --fp16 / --bf16 when given; else fp16 on CUDA cards without bf16,
    bf16 on those with it (a named `card`, cards.py, or this process's), fp32 (None) on the CPU. Asks CUDA, so
    call it after the process has its device."""
    from .cards import card_named

    if bf16:
        return torch.bfloat16
    if fp16 is not None:
        return torch.float16 if fp16 else None
    if card not in (None, "", "auto"):
        return torch.bfloat16 if card_named(card).bf16 else torch.float16
    if not torch.cuda.is_available():
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def run_ds_config(cfg, world_size: int, hidden_size: int, half: Optional[torch.dtype]) -> dict:
    """load_ds_config with a run's options (a TrainConfig) and its meaning of "auto" (trainer_autos)."""
    return load_ds_config(cfg.ds_config, world_size, cfg.micro_batch, cfg.grad_accum, cfg.fp16, cfg.offload,
                          trainer_autos(cfg.learning_rate, cfg.weight_decay, hidden_size, half), cfg.bf16)


def precision(ds: dict) -> torch.dtype:
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32
