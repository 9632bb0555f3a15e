"""Host RAM: what a run will need on each node, what the node has, and what a rank holds now.

With parameter offload every rank keeps its ZeRO-3 partition of the frozen base in pinned (unswappable)
host memory: 29.5 GB / world for ChatTS-14B. A box without that much RAM gets the job OOM-killed minutes
into the 14B load, so the need is printed before loading starts (a warning where the node lacks it).
"""
from __future__ import annotations

import os
import resource
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

GiB = 1024 ** 3
# A rank's RSS beside the pinned weights and the checkpoint pages it maps while loading: Python, torch +
# CUDA/NCCL, DeepSpeed, tokenizer, data index. Fitted to peaks measured on H200s, 2026-11-30 (HISTORY.md
# section 5): 18.0-18.1 GiB a rank on 2 GPUs, 35.4 GiB on 1 GPU, with 4.75 GiB shards.
PROCESS_GIB = 2.5


def rss_gib() -> float:
    """This process's resident memory now (ru_maxrss is the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GiB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def node_memory_gib() -> tuple[float, float]:
    """(available, total) GiB of this machine, from /proc/meminfo."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info.get("MemAvailable", info["MemFree"]) / GiB, info["MemTotal"] / GiB


def ranks_on_this_node(world: int) -> int:
    """Processes of this job on this machine: the launchers say so (DeepSpeed: LOCAL_SIZE, torchrun:
    LOCAL_WORLD_SIZE); else all of them."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return world


def host_need_gib(model_bytes: int, ds: dict, world: int, largest_shard_bytes: int = 0) -> dict:
    """Peak host RAM one rank and this node need: the process, the pages of the largest shard it maps while
    reading its part of it (1/world of the shard), and the pinned partition of the frozen weights under
    parameter offload. (Optimizer offload of the LoRA weights is ~0.1 GB: left out.)"""
    offload = bool(ds.get("zero_optimization", {}).get("offload_param"))
    partition = model_bytes / world / GiB if offload else 0.0
    per_rank = PROCESS_GIB + largest_shard_bytes / world / GiB + partition
    local = ranks_on_this_node(world)
    return {"per_rank_gib": round(per_rank, 1), "pinned_partition_gib": round(partition, 1), "ranks_on_node": local,
            "node_gib": round(per_rank * local, 1)}


class PinnedChunks:
    """Pinned host memory handed out as views of a few chunks of `chunk_bytes`, first fit.

    Why: torch's pinned allocator rounds every request up to a power of two, and DeepSpeed pins each ZeRO-3
    partition on its own. For ChatTS-14B on 2 GPUs that turned 13.9 GiB of partitions into ~22.7 GiB of
    pinned RAM per rank (measured: RSS 25.7 GiB a rank after loading with parameter offload). Chunks of a
    power-of-two size lose nothing to rounding, and first fit leaves little unused at their ends.
    The views are handed out uninitialised: the caller fills them.
    """

    def __init__(self, chunk_bytes: int = 1 << 30, pin: bool = True):
        self.chunk_bytes, self.pin = chunk_bytes, pin
        self.chunks: list[list] = []  # [uint8 buffer, bytes used]

    def place(self, tensor: torch.Tensor, align_bytes: int = 512) -> torch.Tensor:
        """A pinned tensor of `tensor`'s shape and dtype (its values are not copied)."""
        nbytes = tensor.numel() * tensor.element_size()
        slot = next((c for c in self.chunks if c[0].numel() - c[1] >= nbytes), None)
        if slot is None:
            size = max(self.chunk_bytes, 1 << max(nbytes - 1, 0).bit_length())
            # device named: inside zero.Init, DeepSpeed sends tensors created without one to the GPU
            slot = [torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=self.pin), 0]
            self.chunks.append(slot)
        start = slot[1]
        slot[1] = start + -(-nbytes // align_bytes) * align_bytes
        return slot[0][start:start + nbytes].view(tensor.dtype).view(tensor.shape)

    @property
    def reserved_bytes(self) -> int:
        return sum(c[0].numel() for c in self.chunks)


@contextmanager
def partitions_pinned_in_chunks() -> Iterator[Optional[PinnedChunks]]:
    """While building a model under `deepspeed.zero.Init` with parameter offload, route the partitions'
    pinning (DeepSpeed calls `get_accelerator().pin_memory` once per partition) to `PinnedChunks`.
    Nothing changes where nothing is pinned (DeepSpeed's CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    # CHATTS_PIN_IN_CHUNKS=0: DeepSpeed's own pinning, for A/B measurements (benchmarks/HISTORY.md section 5)
    if accelerator.device_name() != "cuda" or os.environ.get("CHATTS_PIN_IN_CHUNKS", "1") == "0":
        yield None
        return
    chunks = PinnedChunks()
    accelerator.pin_memory = lambda tensor, align_bytes=1: chunks.place(tensor)
    try:
        yield chunks
    finally:
        del accelerator.pin_memory  # the class's own method again
