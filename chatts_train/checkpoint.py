"""Adapter and resume checkpoints under ZeRO-3.

- The adapter gathers only the trainable tensors (a few million), on all ranks, and rank 0 writes a PEFT
  adapter keyed like the official model; a tensor with no elements is refused (the classic ZeRO-3 bug).
- The resume checkpoint is DeepSpeed's engine state without the frozen base (optimizer, fp16 masters,
  loss scaler, scheduler), plus the data position and every rank's RNG.
- Saves are atomic: written to a temporary folder, then renamed; `latest` is replaced last. A crash
  during a save leaves the previous checkpoint usable. (Multi-node runs need a shared filesystem.)
"""
from __future__ import annotations

import copy
import os
import random
import shutil
from typing import Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable tensors on rank 0 (empty elsewhere). Must be called on all ranks."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if _rank() == 0:
            out = {n: p.detach().to("cpu", copy=True) for n, p in named}
    for n, t in out.items():
        if t.numel() == 0:
            raise CheckpointError(f"gathered `{n}` is empty: the adapter would be unusable, nothing was written")
    return out


def save_adapter(model, out_dir: str) -> None:
    """Write `adapter_model.safetensors` + `adapter_config.json` (rank 0), atomically. All ranks call it.

    A fully trained encoder goes in as PEFT's `modules_to_save` (keys without the wrapper), so
    `PeftModel.from_pretrained` puts it back on the official model too.
    """
    sd = trainable_state_dict(model)
    if _rank() == 0:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        lora = get_peft_model_state_dict(model, state_dict={n: t for n, t in sd.items() if "lora_" in n})
        encoder = {n: t for n, t in sd.items() if "lora_" not in n}
        config = copy.copy(model.peft_config["default"])
        if encoder:
            config.modules_to_save = sorted(set(config.modules_to_save or []) | {"ts_encoder"})
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        config.save_pretrained(tmp)
        save_file({**lora, **encoder}, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        _replace_dir(tmp, out_dir)
    _barrier()


def _replace_dir(src: str, dst: str) -> None:
    old = dst.rstrip("/") + ".old"
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_resume(engine, ckpt_root: str, step: int, keep: int = 2, extra: Optional[dict] = None) -> str:
    """Engine state (frozen base excluded), data position, RNG and the adapter of that step in
    `ckpt_root/step-N`; the oldest beyond `keep` are removed. All ranks call it."""
    final = os.path.join(ckpt_root, f"step-{step}")
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save_checkpoint(tmp, tag="engine", client_state={"step": step, **(extra or {})}, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    save_adapter(engine.module, os.path.join(tmp, "adapter"))  # ends with a barrier
    if _rank() == 0:
        _replace_dir(tmp, final)
        with open(os.path.join(ckpt_root, LATEST + ".tmp"), "w") as f:
            f.write(f"step-{step}\n")
        os.replace(os.path.join(ckpt_root, LATEST + ".tmp"), os.path.join(ckpt_root, LATEST))
        done = sorted((d for d in os.listdir(ckpt_root) if d.startswith("step-") and d[5:].isdigit()),
                      key=lambda d: int(d[5:]))
        for d in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    _barrier()
    return final


def latest_resume(ckpt_root: str) -> Optional[str]:
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        found = os.path.join(ckpt_root, f.read().strip())
    return found if os.path.isdir(found) else None


def load_resume(engine, ckpt_root: str) -> tuple[int, dict]:
    """Restore the latest resume checkpoint; returns (optimizer step to continue from, client state)."""
    path = latest_resume(ckpt_root)
    if path is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_root} (expected {ckpt_root}/{LATEST})")
    _, client = engine.load_checkpoint(path, tag="engine", load_module_strict=False, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load the engine state")
    rng = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(client["step"]), client
