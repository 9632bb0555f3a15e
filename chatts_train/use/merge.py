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

from ..formats.adapter import read_adapter
from ..errors import CheckpointError
from ..model.modeling import check_checkpoint
from ..model.shards import weight_map


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


def check_fit(model_path: str, files: dict[str, str], deltas: dict, replace: dict) -> None:
    """Every adapter tensor has a base weight of its shape: checked from the shard headers, before writing."""
    shapes = {}
    for shard in sorted(set(files.values())):
        with safe_open(os.path.join(model_path, shard), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    missing = sorted(k for k in (*deltas, *replace) if k not in shapes)
    if missing:
        raise CheckpointError(f"adapter tensors without a base weight: {', '.join(missing[:5])}; "
                              f"the adapter belongs to another model")
    for key, (a, b, _) in deltas.items():
        if shapes[key] != (b.shape[0], a.shape[1]):
            raise CheckpointError(f"adapter weight for `{key}` is {b.shape[0]}x{a.shape[1]} but the base has "
                                  f"{shapes[key]}: the adapter belongs to another model shape")
    for key, t in replace.items():
        if shapes[key] != tuple(t.shape):
            raise CheckpointError(f"adapter tensor `{key}` {tuple(t.shape)} does not fit the base {shapes[key]}")


def merge(model_path: str, adapter_dir: str, out_dir: str) -> str:
    """Write base + adapter to `out_dir`, which must not exist yet. Everything is checked first and written
    to `out_dir.tmp`, renamed at the end: a failed merge leaves no partial checkpoint behind."""
    check_checkpoint(model_path)
    if os.path.abspath(out_dir) == os.path.abspath(model_path):
        raise CheckpointError("--out must differ from --model: the base checkpoint is never overwritten")
    if os.path.exists(out_dir):
        raise CheckpointError(f"--out {out_dir} exists already; name a new folder (nothing is overwritten)")
    deltas, replace = adapter_deltas(adapter_dir)
    files = weight_map(model_path)
    check_fit(model_path, files, deltas, replace)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for shard in sorted(set(files.values())):
        tensors = {}
        with safe_open(os.path.join(model_path, shard), framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                t = f.get_tensor(key)
                if key in deltas:
                    a, b, s = deltas[key]
                    t = (t.float() + s * (b.float() @ a.float())).to(t.dtype)
                elif key in replace:
                    t = replace[key].to(t.dtype)
                tensors[key] = t
        save_file(tensors, os.path.join(tmp, shard), metadata=metadata or {"format": "pt"})
        del tensors
    for name in os.listdir(model_path):
        src = os.path.join(model_path, name)
        if os.path.isfile(src) and not name.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(tmp, name))
    os.replace(tmp, out_dir)
    return out_dir
