"""What holds GPU memory at the peak of set-up (building the engine), per rank, from CUDA's allocation trace.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/setup_trace.py [--out DIR]

Builds the engine as `train()` and memprobe do (`prepare_engine`, ChatTS-14B-0801 shape from config, no
offload), recording every allocation with its Python stack, then replays the trace: the peak of allocated
bytes and the allocations live at that moment, grouped by where they were made. GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from instruments import GiB  # noqa: E402
from memprobe import shape_config  # noqa: E402


def where(frames: list[dict]) -> str:
    """The innermost frames outside torch itself: who asked for the memory."""
    ours = [f for f in frames if "/torch/" not in f["filename"] and f["filename"] != "??"]
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in ours[:4])


def peak_of(trace: list[dict]) -> dict:
    """Replay alloc / free events: the highest live total and what was live then, by call site."""
    def replay(stop: int):
        live: dict[int, tuple[int, str]] = {}
        total = best = best_at = 0
        for i, e in enumerate(trace[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], e)
                total += e["size"]
                if total > best:
                    best, best_at = total, i + 1
            elif e["action"] == "free_completed" and e["addr"] in live:
                total -= live.pop(e["addr"])[0]
        return best, best_at, live

    best, best_at, _ = replay(len(trace))
    at_best = {k: (size, where(e.get("frames", []))) for k, (size, e) in replay(best_at)[2].items()}  # live at the peak
    sites: dict[str, float] = {}
    for size, site in at_best.values():
        sites[site] = sites.get(site, 0.0) + size / GiB
    top = sorted(sites.items(), key=lambda kv: -kv[1])[:12]
    return {"peak_traced_gib": round(best / GiB, 3), "live_at_peak_by_site_gib": [[s, round(g, 3)] for s, g in top]}


def main() -> None:
    import torch

    from chatts_train.training.config import TrainConfig
    from chatts_train.fit.dsconfig import load_ds_config
    from chatts_train.training.engine import init_process, prepare_engine
    from chatts_train.fit.plan import apply_to_ds, reference_plan

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/setup_trace")
    a = p.parse_args()
    rank, world, device = init_process(42)
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500000)
    ds = load_ds_config(os.path.join(os.path.dirname(__file__), "..", "ds_config.json"), world, 1, 8, fp16=True,
                        offload="none")
    shape = shape_config(argparse.Namespace(config=None, release="0801"))
    plan = reference_plan(shape.num_hidden_layers)  # ZeRO-3's set-up is what this traces
    engine, hf_ds = prepare_engine(TrainConfig(model_path=""), apply_to_ds(plan, ds), 1000, plan, shape=shape)
    snap = torch.cuda.memory._snapshot(device)
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][device.index]
    result = {"rank": rank, "max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
              "allocated_after_gib": round(torch.cuda.memory_allocated(device) / GiB, 3),
              "reserved_after_gib": round(torch.cuda.memory_reserved(device) / GiB, 3),
              "trace_events": len(trace), **peak_of(trace)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"setup_trace_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
