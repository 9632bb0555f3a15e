"""What memprobe measures with: device-level memory, bytes per collective, the profiler's time budget of a
micro-step, and peak memory per phase of it. Each wraps the real step from outside; none changes it."""
from __future__ import annotations

import os
import threading
import time

GiB = 1024 ** 3


class DeviceSampler(threading.Thread):
    """Device-level memory in use (CUDA context and everything else included), sampled every 5 ms; the peak
    is kept per section (`sampler.section = "steps"` once set-up is over), to tell set-up from training."""

    def __init__(self, device):
        super().__init__(daemon=True)
        self.device, self.running, self.section, self.peaks = device, True, "setup", {}

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    def run(self):
        import torch

        while self.running:
            free, total = torch.cuda.mem_get_info(self.device)
            self.peaks[self.section] = max(self.peaks.get(self.section, 0), total - free)
            time.sleep(0.005)


def steady_median(times: list[float], first: int, skip=None) -> float:
    """Median micro-step time from micro-step `first` on (after the warm-up optimizer step), leaving out
    micro-step `skip` (the profiled one: slower under the profiler, and the other ranks wait for it)."""
    steady = [t for i, t in enumerate(times) if i >= first and i != skip] or times
    return sorted(steady)[len(steady) // 2]


def outside_allocator_gib(device) -> float:
    """Device memory in use that PyTorch's allocator did not reserve: the CUDA context, NCCL's buffers, and
    libraries that allocate for themselves."""
    import torch

    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / GiB


def count_traffic() -> dict:
    """Bytes this rank sends over its links per collective kind, from now on: ring all-gathers and
    reduce-scatters move (w-1)/w of the whole tensor per rank, all-reduces twice that. DeepSpeed's backend
    keeps its own references to the all-gather and reduce-scatter functions; all-reduces (DeepSpeed's and
    vocab_parallel's) and list all-gathers go through torch.distributed at call time."""
    import torch.distributed as tdist
    from deepspeed.comm import comm

    seen = {"all_gather": 0.0, "reduce_scatter": 0.0, "all_reduce": 0.0}

    def frac(group) -> float:
        w = tdist.get_world_size(group)
        return (w - 1) / w

    def counted(fn, kind, size):
        def call(*args, **kw):
            seen[kind] += size(*args, **kw)
            return fn(*args, **kw)
        return call

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    cdb = comm.cdb
    cdb.all_gather_function = counted(cdb.all_gather_function, "all_gather",
                                      lambda output_tensor, input_tensor, group=None, **_: nbytes(output_tensor) * frac(group))
    cdb.reduce_scatter_function = counted(cdb.reduce_scatter_function, "reduce_scatter",
                                          lambda output, input, *a, group=None, **_: nbytes(input) * frac(group))
    tdist.all_reduce = counted(tdist.all_reduce, "all_reduce",
                               lambda tensor, *a, group=None, **_: 2 * nbytes(tensor) * frac(group))
    tdist.all_gather = counted(tdist.all_gather, "all_gather",
                               lambda tensor_list, tensor, group=None, **_: sum(map(nbytes, tensor_list)) * frac(group))
    return seen


def kernel_budget(prof, wall_s: float) -> dict:
    """Where one micro-step's wall time went on the GPU, from the profiler's kernels: seconds of compute
    (GEMMs, attention, the rest), of communication (NCCL) and of the part of it no compute overlaps, of
    copies, and idle (no kernel running: the CPU side, i.e. ZeRO-3's hooks and launches, is the bottleneck)."""
    from torch.autograd import DeviceType

    # attention first: the memory-efficient kernels are CUTLASS ones (fmha_cutlassF...), cuDNN's say sdpa
    kinds = {"attention": ("fmha", "flash", "attention", "efficient", "sdpa"), "gemm": ("gemm", "cutlass", "xmma", "nvjet", "cublas"),
             "nccl": ("nccl",), "copy": ("memcpy", "memset")}
    spans: dict[str, list] = {k: [] for k in (*kinds, "other")}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = next((k for k, keys in kinds.items() if any(x in name for x in keys)), "other")
        spans[kind].append((e.time_range.start, e.time_range.end))

    def union(intervals) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total / 1e6

    everything = [x for v in spans.values() for x in v]
    compute = spans["gemm"] + spans["attention"] + spans["other"]
    busy = union(everything)
    out = {f"{k}_s": round(sum(b - a for a, b in v) / 1e6, 4) for k, v in spans.items()}
    out.update(wall_s=round(wall_s, 4), gpu_busy_s=round(busy, 4), compute_busy_s=round(union(compute), 4),
               nccl_exposed_s=round(busy - union(compute + spans["copy"]), 4), idle_s=round(wall_s - busy, 4),
               kernels=len(everything))
    return out


class PhasePeaks:
    """Peak allocated and reserved GiB inside the engine's forward, backward and step, and allocated at their
    start, by wrapping those methods on this engine instance (micro_step itself is unchanged)."""

    def __init__(self, engine, device):
        self.peaks: dict[str, float] = {}
        for name in ("forward", "backward", "step"):
            setattr(engine, name, self._wrap(getattr(engine, name), name, device))

    def _keep(self, key: str, gib: float) -> None:
        self.peaks[key] = max(self.peaks.get(key, 0.0), gib)

    def _wrap(self, fn, name, device):
        import torch

        def call(*args, **kwargs):
            # what the phase starts with (after forward: the base, checkpoints and anything else kept)
            self._keep(f"{name}_start", torch.cuda.memory_allocated(device) / GiB)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                return fn(*args, **kwargs)
            finally:
                self._keep(name, torch.cuda.max_memory_allocated(device) / GiB)
                self._keep(f"{name}_reserved", torch.cuda.max_memory_reserved(device) / GiB)
        return call


def take_option(argv: list, key: str, default: str) -> str:
    """A benchmark's own `key VALUE` taken out of `argv`, which then holds training's options alone."""
    if key not in argv:
        return default
    at = argv.index(key)
    value = argv[at + 1]
    del argv[at:at + 2]
    return value


def start_profile():
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.start()
    return prof


def write_kernel_table(prof, folder: str, name: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"kernels_{name}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


def memory(device) -> dict:
    import torch

    from chatts_train.training.metrics import memory_snapshot

    m = memory_snapshot(device)
    out = {"peak_allocated_gib": m["allocated"], "peak_reserved_gib": m["reserved"], "peak_active_gib": m["active"],
           "alloc_retries": m["alloc_retries"]}
    if device.type == "cuda":  # free bytes stranded inside split blocks: the allocator's fragmentation
        out["inactive_split_peak_gib"] = torch.cuda.memory_stats(device).get("inactive_split_bytes.all.peak", 0) / GiB
    return out
