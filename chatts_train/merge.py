"""Fold a LoRA adapter into the base weights and write a checkpoint in the published ChatTS format.

Shard by shard: one base shard is in memory at a time (plus the few-MB adapter), so a 28 GB model never
sits whole in RAM. W' = W + (alpha / r) * B @ A, computed in fp32 and stored in the shard's dtype; a fully
trained encoder (`modules_to_save`) replaces its tensors. config.json, the index, generation config and
tokenizer files are copied as they are.
"""
from __future__ import annotations

import math
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import read_adapter
from .errors import CheckpointError
from .modeling import check_checkpoint
from .weights import weight_map


def adapter_deltas(adapter_dir: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """({base weight key: (A, B, scale)}, {base key: replacement tensor}) from a PEFT adapter folder."""
    cfg, tensors = read_adapter(adapter_dir)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    lora: dict[str, dict] = {}
    replace = {}
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name or ".lora_B." in name:
            module, part = name.split(".lora_")
            lora.setdefault(f"{module}.weight", {})[part[0]] = t
        else:
            replace[name] = t
    deltas = {}
    for k, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{adapter_dir}: `{k}` has lora_{''.join(ab)} but not both A and B")
        deltas[k] = (ab["A"], ab["B"], scale)
    return deltas, replace


def merge(model_path: str, adapter_dir: str, out_dir: str) -> str:
    check_checkpoint(model_path)
    deltas, replace = adapter_deltas(adapter_dir)
    shards = sorted(set(weight_map(model_path).values()))
    if os.path.abspath(out_dir) == os.path.abspath(model_path):
        raise CheckpointError("--out must differ from --model: the base checkpoint is never overwritten")
    os.makedirs(out_dir, exist_ok=True)
    pending = set(deltas) | set(replace)
    for shard in shards:
        tensors = {}
        with safe_open(os.path.join(model_path, shard), framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                t = f.get_tensor(key)
                if key in deltas:
                    a, b, s = deltas[key]
                    if t.shape != (b.shape[0], a.shape[1]):
                        raise CheckpointError(f"adapter weight for `{key}` is {b.shape[0]}x{a.shape[1]} but the base "
                                              f"has {tuple(t.shape)}: the adapter belongs to another model shape")
                    t = (t.float() + s * (b.float() @ a.float())).to(t.dtype)
                elif key in replace:
                    if replace[key].shape != t.shape:
                        raise CheckpointError(f"adapter tensor `{key}` {tuple(replace[key].shape)} does not fit the "
                                              f"base {tuple(t.shape)}")
                    t = replace[key].to(t.dtype)
                pending.discard(key)
                tensors[key] = t
        save_file(tensors, os.path.join(out_dir, shard), metadata=metadata or {"format": "pt"})
        del tensors
    if pending:
        raise CheckpointError(f"adapter tensors without a base weight: {', '.join(sorted(pending)[:5])}; "
                              f"the adapter belongs to another model")
    for name in os.listdir(model_path):
        src = os.path.join(model_path, name)
        if os.path.isfile(src) and not name.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(out_dir, name))
    return out_dir
