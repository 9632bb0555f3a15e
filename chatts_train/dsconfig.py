"""The DeepSpeed config of a run: the JSON file, checked, with the run's overrides applied."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import TrainingError, read_json_object

OFFLOAD_CHOICES = ("none", "param", "optimizer", "all")


def read_ds_config(path: str) -> dict:
    """The DeepSpeed JSON as it is on disk, or a one-line error saying what is wrong with the file."""
    return read_json_object(path, TrainingError, f"--ds_config {path}: no such file (the project ships "
                            f"ds_config.json in its root)", "fix it or pass another --ds_config")


def load_ds_config(path: str, world_size: int, micro_batch: Optional[int] = None, grad_accum: Optional[int] = None,
                   fp16: Optional[bool] = None, offload: Optional[str] = None) -> dict:
    """The run's DeepSpeed config: the JSON with the run's overrides (micro-batch, accumulation, fp16,
    offload) applied, so the batch sizes always add up. The one place where the two meet; every problem
    found is reported at once."""
    ds = read_ds_config(path)
    problems = []
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


def precision(ds: dict) -> torch.dtype:
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32
