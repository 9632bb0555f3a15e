"""Which process this is, for code that runs with or without a process group."""
from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank0_print(*args) -> None:
    if rank() == 0:
        print(*args, flush=True)
