"""Workarounds for DeepSpeed on its CPU accelerator (gloo): the tests' and the demo's backend. Process set-up
calls them visibly, before the process group exists; on GPUs they do nothing."""
from __future__ import annotations

import torch


class _Completed:
    """Handle of a collective that already finished."""

    def wait(self) -> None:
        pass


def fix_cpu_accelerator() -> None:
    """Three DeepSpeed 0.18 faults that only the CPU accelerator shows, corrected there. Call it before
    `deepspeed.init_distributed` (the first one acts there); later calls do nothing.

    - Each process starting its process group JIT-compiles DeepSpeed's shared-memory all-reduce (~42 s with g++
      on a fresh 2-core machine, the other ranks waiting on the build's lock file, which a build killed mid-way
      leaves for every later start to wait on), and under DeepSpeed's launcher each rank then creates a 66 MiB
      segment in /dev/shm that nothing removes (seen here: 132 MiB left behind by every 2-rank run) and waits,
      with no timeout, for its peers' segments to appear (seen here with /dev/shm unwritable: both ranks spin
      at 100% of a core and never start). Only DeepSpeed's inference all-reduce uses it, which training never
      calls: it is not built, and gloo does every collective.
    - ZeRO-3 launches several async all-gathers and waits only for the last one ("ordered on the CUDA stream").
      With gloo they are not ordered, and ZeRO-3 then reads half-gathered weights: seen here as NaN or random
      weights after loading and run-to-run different losses. Those gathers are made blocking.
    - ZeRO-1 and -2 without gradient hooks (ZeRO-1 as the plan runs it) reduce the gradients at the optimizer
      step in buckets by type, found by `tensor.type() == "torch.cpu.FloatTensor"`; a CPU tensor's type is
      "torch.FloatTensor", so no bucket matched and nothing was reduced: each rank stepped on its own gradients
      (seen here: the LoRA update of 2 ranks 2x off the reference's). Buckets are made by dtype instead.
    """
    import importlib

    import deepspeed.comm as dcomm
    import deepspeed.runtime.zero.stage_1_and_2 as zero12
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or getattr(dcomm, "_chatts_fixed", False):
        return
    for name in ("all_gather", "all_gather_into_tensor"):
        original = getattr(dcomm, name)

        def blocking(*args, _original=original, async_op=False, **kwargs):
            handle = _original(*args, async_op=False, **kwargs)
            return (handle or _Completed()) if async_op else handle

        setattr(dcomm, name, blocking)
    # the module, not `deepspeed.comm.torch` as a name: that is torch itself, which deepspeed.comm imports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # TorchBackend's "no SHM op"
    zero12.split_half_float_double = _buckets_by_dtype
    dcomm._chatts_fixed = True


def _buckets_by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    order = (torch.float16, torch.float32, torch.float64, torch.bfloat16)  # DeepSpeed's, so every rank agrees
    return [b for b in ([t for t in tensors if t.dtype == d] for d in order) if b]
