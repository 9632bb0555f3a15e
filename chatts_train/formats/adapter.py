"""LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors`, PEFT's layout, keyed for the
official model): written from a ZeRO-3 engine, and read back with checks, in this one place.

Writing gathers only the trainable tensors (a few million), on all ranks, and rank 0 writes; a tensor with
no elements is refused (the classic ZeRO-3 bug).
"""
from __future__ import annotations

import copy
import os
import shutil

import deepspeed
import torch

from ..errors import CheckpointError, read_json_object
from ..ranks import barrier, rank

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable tensors on rank 0 (empty elsewhere). Must be called on all ranks."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if rank() == 0:
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
    if rank() == 0:
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
        save_file({**lora, **encoder}, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        replace_dir(tmp, out_dir)
    barrier()


def replace_dir(src: str, dst: str) -> None:
    """Put folder `src` at `dst`, replacing what was there only once `src` is complete."""
    old = dst.rstrip("/") + ".old"
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_adapter(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the tensors), with one clear error for a missing, corrupt or
    inconsistent adapter folder."""
    from safetensors.torch import load_file

    for f in (CONFIG, WEIGHTS):
        if not os.path.isfile(os.path.join(adapter_dir, f)):
            raise CheckpointError(f"{adapter_dir}: no {f}; point --adapter at a folder written by training "
                                  f"(runs/.../adapter or checkpoints/step-N/adapter)")
    weights = os.path.join(adapter_dir, WEIGHTS)
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises several types for truncated or corrupt files
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}); use another checkpoint's adapter") from None
    config = read_json_object(os.path.join(adapter_dir, CONFIG), CheckpointError, f"{adapter_dir}: no {CONFIG}",
                              "use another checkpoint's adapter")
    a_shapes = {t.shape[0] for k, t in tensors.items() if ".lora_A" in k}
    if a_shapes and a_shapes != {config.get("r")}:
        raise CheckpointError(f"{adapter_dir}: adapter_config.json says rank {config.get('r')} but the weights have "
                              f"rank {sorted(a_shapes)}; the files do not belong together")
    return config, tensors
