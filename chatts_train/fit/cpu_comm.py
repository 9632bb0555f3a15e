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
    `deepspeed.init_distributed` (the first one acts there); later calls do nothing. (How each was found:
    benchmarks/HISTORY.md, "CPU accelerator faults".)

    - Starting a process group JIT-compiles DeepSpeed's shared-memory all-reduce and makes every rank wait,
      without a timeout, on /dev/shm segments nothing removes; only inference uses it: it is not built.
    - ZeRO-3 waits only for the last of several async all-gathers, relying on CUDA stream order that gloo lacks,
      and reads half-gathered weights: those gathers are made blocking.
    - ZeRO-1/-2 without gradient hooks bucket gradients by `tensor.type()` strings that no CPU tensor has, so
      nothing was reduced: buckets are made by dtype instead.
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
