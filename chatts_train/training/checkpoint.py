"""Resume checkpoints under ZeRO-3 (the adapter files themselves: adapter.py).

- The resume checkpoint is DeepSpeed's engine state without the frozen base (optimizer, fp16 masters,
  loss scaler, scheduler), plus the data position and every rank's RNG.
- Saves are atomic: written to a temporary folder, then renamed; `latest` is replaced last. A crash
  during a save leaves the previous checkpoint usable. (Multi-node runs need a shared filesystem.)
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import zipfile
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..formats.adapter import replace_dir, save_adapter
from ..errors import CheckpointError, RankError
from ..ranks import barrier, rank

LATEST = "latest"


def _rng_file(folder: str, r: int) -> str:
    """Where rank `r`'s RNG state lies in a resume checkpoint's folder."""
    return os.path.join(folder, f"rng_rank{r}.pt")


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
    try:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        engine.save_checkpoint(tmp, tag="engine", client_state={"step": step, **(extra or {})}, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save(_rng_state(), _rng_file(tmp, rank()))
        save_adapter(engine.module, os.path.join(tmp, "adapter"))  # ends with a barrier
    except (OSError, RuntimeError) as e:  # a full disk, a quota, a vanished mount: this rank's own failure
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in DISK_FULL):
            raise
        raise RankError(_cannot_write(e, tmp, ckpt_root, step)) from None
    if rank() == 0:
        replace_dir(tmp, final)
        with open(os.path.join(ckpt_root, LATEST + ".tmp"), "w") as f:
            f.write(f"step-{step}\n")
        os.replace(os.path.join(ckpt_root, LATEST + ".tmp"), os.path.join(ckpt_root, LATEST))
        done = sorted((d for d in os.listdir(ckpt_root) if d.startswith("step-") and d[5:].isdigit()),
                      key=lambda d: int(d[5:]))
        for d in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    barrier()
    return final


# how torch.save reports a write that ran out of space (its C++ stream, not an OSError)
DISK_FULL = ("unexpected pos", "iostream error", "No space left", "PytorchStreamWriter failed")


def _cannot_write(e: Exception, tmp: str, ckpt_root: str, step: int) -> str:
    """One line: where the write failed, the space it needs and has, and the last good checkpoint."""
    free = shutil.disk_usage(ckpt_root).free if os.path.isdir(ckpt_root) else 0
    good = newest_checkpoint(ckpt_root)
    need = _folder_bytes(good) if good else 0
    full = isinstance(e, RuntimeError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    why = "disk full" if full else (getattr(e, "strerror", None) or str(e))
    size = f"a checkpoint needs ~{need / 2 ** 20:.0f} MiB, {free / 2 ** 20:.0f} MiB are free; " if need else ""
    last = (f"the last good checkpoint is {good} (kept): " if good else "no earlier checkpoint exists: ")
    return (f"{why} at {tmp} writing the checkpoint of step {step}: {size}{last}free space, then continue with "
            f"--resume")


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def newest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The newest complete step folder (a step-N folder exists only once its save completed: it is renamed
    from step-N.tmp), or None."""
    if not os.path.isdir(ckpt_root):
        return None
    done = [d for d in os.listdir(ckpt_root) if d.startswith("step-") and d[5:].isdigit()
            and os.path.isdir(os.path.join(ckpt_root, d, "engine"))]
    return os.path.join(ckpt_root, max(done, key=lambda d: int(d[5:]))) if done else None


def latest_resume(ckpt_root: str) -> str:
    """The checkpoint `latest` names; without a `latest` file (lost, deleted), the newest complete step
    folder; else a CheckpointError that says what is wrong."""
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.isfile(path):
        newest = newest_checkpoint(ckpt_root)
        if newest:
            return newest
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_root} (no {LATEST} file and no complete step "
                              f"folder there): this run never saved one; start it again without --resume")
    with open(path) as f:
        name = f.read().strip()
    found = os.path.join(ckpt_root, name)
    if not name or not os.path.isdir(os.path.join(found, "engine")):
        saved = sorted((d for d in os.listdir(ckpt_root) if d.startswith("step-") and d[5:].isdigit()),
                       key=lambda d: int(d[5:]))
        hint = f"; the checkpoints there are {', '.join(saved)}: write the newest to {path}" if saved else ""
        raise CheckpointError(f"--resume: {path} names {name or 'nothing'!r}, which is not a complete checkpoint{hint}")
    return found


def _unreadable(path: str, me: int) -> list[str]:
    """The files of checkpoint `path` that rank `me` reads and whose zip directory cannot be read: a save cut
    short (torch.save writes a zip archive, its directory last), found by reading only each file's end."""
    engine_dir = os.path.join(path, "engine")
    mine = [os.path.join(engine_dir, n) for n in sorted(os.listdir(engine_dir))
            if n.endswith(".pt") and (n.startswith("mp_rank_") or f"zero_pp_rank_{me}_" in n)]
    rng = _rng_file(path, me)
    if os.path.isfile(rng):
        mine.append(rng)
    bad = []
    for f in mine:
        try:
            zipfile.ZipFile(f).close()
        except (OSError, zipfile.BadZipFile) as e:
            bad.append(f"{os.path.relpath(f, path)} ({e})")
    return bad


def load_resume(engine, ckpt_root: str) -> tuple[int, dict]:
    """Restore the latest resume checkpoint; returns (optimizer step to continue from, client state)."""
    path = latest_resume(ckpt_root)
    # Every rank checks its own files and all agree before any loads: a rank that failed inside DeepSpeed's
    # load alone would leave the others waiting in the next collective for good.
    bad = {rank(): _unreadable(path, rank())}
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, bad)
        bad = {r: b for d in every for r, b in d.items()}
    if any(bad.values()):
        named = "; ".join(f"rank {r}: {', '.join(b)}" for r, b in sorted(bad.items()) if b)
        raise CheckpointError(f"--resume: {path} is cut short or corrupt ({named}). Resume from an earlier "
                              f"checkpoint by naming it in {ckpt_root}/{LATEST}")
    try:
        _, client = engine.load_checkpoint(path, tag="engine", load_module_strict=False, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except Exception as e:  # truncated files, another LoRA shape or world size: DeepSpeed's own words, one line
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"--resume: {path} cannot be loaded ({type(e).__name__}: {reason}). Resume with the "
                              f"run's settings, or from an earlier checkpoint by naming it in {ckpt_root}/{LATEST}") from None
    if client is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load the engine state")
    rng = _rng_file(path, rank())
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(client["step"]), client
