"""The real loop's budget of one optimizer step: `train()` as launch.sh runs it, with one optimizer step
profiled from the end of the step before it to its own end (the metrics line of the step before, this step's
data, its all-reduce, every micro-step), nothing in the loop changed: what it calls is timed from outside.

    python benchmarks/loop_budget.py --budget_step 3 [training options]       (one GPU)

Writes OUTPUT_DIR/budget.json (and the window's timeline, budget_trace.json): wall time of the window; GPU busy by kind of kernel and idle
(instruments.kernel_budget); host time by what the loop called (data, the step's all-reduce, forward,
backward, engine.step, metrics, and the rest); the host's waits on the GPU by the operation that waited
(`.item()`, `nonzero`, boolean indexing, copies to the host); kernel launches. The profiler slows the host
side down: `steady_step_s` (the unprofiled steps' median from metrics.jsonl) is the step's real time.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from instruments import kernel_budget, start_profile, take_option  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class Budget:
    """Host seconds per cause inside the profiled window; the window itself opens and closes at a metrics line."""

    def __init__(self, step: int):
        self.step, self.host, self.prof, self.t0, self.result = step, defaultdict(float), None, 0.0, None

    def timed(self, name: str, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.prof is not None:
                    self.host[name] += time.perf_counter() - t
        return call

    def around_metrics(self, step_row):
        """step_row(run, step, ...) ends every optimizer step: the window opens before step `self.step - 1`'s
        and closes before step `self.step`'s (steps counted from 1 as in metrics.jsonl)."""
        def call(run, step, *args, **kwargs):
            import torch

            sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
            if step + 1 == self.step - 1 and run.rank == 0:
                sync()
                self.prof, self.t0 = start_profile(), time.perf_counter()
            elif step + 1 == self.step and self.prof is not None:
                sync()
                wall = time.perf_counter() - self.t0
                self.prof.stop()
                self.result = summarise(self.prof, wall, dict(self.host))
                # the timeline itself (chrome://tracing, Perfetto): where the GPU waits, launch by launch
                self.prof.export_chrome_trace(os.path.join(run.cfg.output_dir, "budget_trace.json"))
                self.prof = None
            t = time.perf_counter()
            try:
                return step_row(run, step, *args, **kwargs)
            finally:
                if self.prof is not None:
                    self.host["metrics"] += time.perf_counter() - t
        return call


def summarise(prof, wall: float, host: dict) -> dict:
    """The window's GPU budget, host budget and the host's waits on the GPU by the operation that waited."""
    from torch.autograd import DeviceType

    waits, launches = defaultdict(float), 0
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        if "LaunchKernel" in e.name:
            launches += 1
        if e.name.startswith(SYNC_CALLS):
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            op = parent.name if parent is not None else e.name
            while parent is not None and parent.cpu_parent is not None and parent.cpu_parent.name.startswith("aten::"):
                parent = parent.cpu_parent  # the outermost aten op: aten::item over aten::_local_scalar_dense
                op = parent.name
            waits[op] += e.time_range.elapsed_us() / 1e6
    host = {k: round(v, 4) for k, v in host.items()}
    host["other"] = round(wall - sum(host.values()), 4)
    return {"wall_s": round(wall, 4), "gpu": kernel_budget(prof, wall), "host_s": host,
            "host_waits_on_gpu_s": {k: round(v, 4) for k, v in sorted(waits.items(), key=lambda kv: -kv[1])},
            "kernel_launches": launches}


def main() -> None:
    import chatts_train.training.loop as loop
    from chatts_train.training.config import TrainConfig, parse_config
    from chatts_train.data.indexing import SampleReader

    argv = sys.argv[1:]
    step = int(take_option(argv, "--budget_step", "3"))
    budget = Budget(max(step, 2))
    SampleReader.__getitem__ = budget.timed("data", SampleReader.__getitem__)
    loop.collate, loop.pack = budget.timed("data", loop.collate), budget.timed("data", loop.pack)
    loop.step_token_scale = budget.timed("step_all_reduce", loop.step_token_scale)
    if hasattr(loop.StopRequest, "agreed"):  # the loop before the budget: a stop all-reduce per micro-step
        loop.StopRequest.agreed = budget.timed("stop_all_reduce", loop.StopRequest.agreed)
    loop.step_row = budget.around_metrics(loop.step_row)
    wrapped = set()
    timed_micro_step = budget.timed("micro_step_rest", loop.micro_step)

    def step_fn(engine, batch, token_scale):
        if id(engine) not in wrapped:
            wrapped.add(id(engine))
            for name in ("forward", "backward", "step"):
                setattr(engine, name, budget.timed(name, getattr(engine, name)))
        return timed_micro_step(engine, batch, token_scale)

    cfg = parse_config(TrainConfig, argv)
    loop.train(cfg, step_fn)
    if budget.result is None:
        return
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steady = sorted(r["step_time_s"] for r in rows[1:] if r["step"] != budget.step) or [rows[-1]["step_time_s"]]
    host = budget.result["host_s"]
    # micro_step_rest timed the whole micro-step around the engine's three calls: keep only what is outside them
    host["micro_step_rest"] = round(host.get("micro_step_rest", 0.0) - sum(host.get(k, 0.0) for k in ("forward", "backward", "step")), 4)
    host["other"] = round(budget.result["wall_s"] - sum(v for k, v in host.items() if k != "other"), 4)
    out = {"budget_step": budget.step, "steady_step_s": steady[len(steady) // 2],
           "profiled_step_s": next(r["step_time_s"] for r in rows if r["step"] == budget.step),
           "tokens": next(r["tokens"] for r in rows if r["step"] == budget.step), **budget.result}
    with open(os.path.join(cfg.output_dir, "budget.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("[budget] " + json.dumps(out))


if __name__ == "__main__":
    main()
