"""What the user sees: per-step metrics (JSONL, TensorBoard), memory per GPU, the end-of-run report and plot."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..fit.hostmem import GiB, peak_rss_gib


def memory_snapshot(device: torch.device) -> dict[str, float]:
    """Peak active / allocated / reserved GiB on this rank since the last reset, plus allocator retries
    (a sign of running close to the edge) and host RAM peak."""
    host = peak_rss_gib()
    if device.type != "cuda":
        return {"active": 0.0, "allocated": 0.0, "reserved": 0.0, "alloc_retries": 0, "host": host}
    s = torch.cuda.memory_stats(device)
    return {"active": s.get("active_bytes.all.peak", 0) / GiB, "allocated": torch.cuda.max_memory_allocated(device) / GiB,
            "reserved": torch.cuda.max_memory_reserved(device) / GiB, "alloc_retries": s.get("num_alloc_retries", 0),
            "host": host}


def gather_named(values: dict[str, float], device: torch.device) -> list[dict[str, float]]:
    """Every rank's `values` ({name: number}), on every rank, in rank order (a handful of numbers per step)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    gathered = [t]
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t)
    return [dict(zip(values, g.tolist())) for g in gathered]


class MetricsLog:
    """Rank 0 writes `metrics.jsonl` (one line per optimizer step) and, if installed, TensorBoard events."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.rows: list[dict] = []
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            # A resumed run redoes the steps after its checkpoint: drop their old lines, keep the rest.
            with open(self.path) as f:
                self.rows = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= resume_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(self.path + ".tmp", self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                pass

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def summarise_run(rows: list[dict], wall_s: float, samples: int, first_step_s: Optional[float]) -> dict:
    if not rows:
        return {"steps": 0, "wall_time_s": round(wall_s, 1)}
    world = len(rows[-1]["peak_allocated_gib"])
    return {
        "steps": rows[-1]["step"],
        "wall_time_s": round(wall_s, 1),
        "time_to_first_step_s": None if first_step_s is None else round(first_step_s, 1),
        "samples": samples,
        "tokens": int(sum(r["tokens"] for r in rows)),
        "answer_tokens": int(sum(r["answer_tokens"] for r in rows)),
        "tokens_per_s_per_gpu": round(sum(r["tokens"] for r in rows) / max(sum(r["step_time_s"] for r in rows), 1e-9) / world, 1),
        "skipped_steps": int(sum(r["skipped"] for r in rows)),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "final_loss_scale": rows[-1]["loss_scale"],
        "peak_allocated_gib_per_gpu": [round(max(r["peak_allocated_gib"][g] for r in rows), 2) for g in range(world)],
        "peak_reserved_gib_per_gpu": [round(max(r["peak_reserved_gib"][g] for r in rows), 2) for g in range(world)],
    }


def format_run_summary(s: dict) -> str:
    lines = ["", "=== run summary ==="]
    lines += [f"{k:>28}: {v}" for k, v in s.items()]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> Optional[str]:
    """Loss, lr, loss scale and memory curves in one PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(steps, [r["loss"] for r in rows])
    ax[0, 0].set_title("loss (mean over answer tokens)")
    ax[0, 1].plot(steps, [r["lr"] for r in rows])
    ax[0, 1].set_title("learning rate")
    ax[1, 0].plot(steps, [r["loss_scale"] for r in rows])
    ax[1, 0].set_yscale("log", base=2)
    ax[1, 0].set_title("fp16 loss scale")
    on_gpu = any(v > 0 for r in rows for v in r["peak_reserved_gib"])
    for g in range(len(rows[0]["peak_allocated_gib"])):
        if on_gpu:
            ax[1, 1].plot(steps, [r["peak_allocated_gib"][g] for r in rows], label=f"GPU{g} allocated")
            ax[1, 1].plot(steps, [r["peak_reserved_gib"][g] for r in rows], "--", label=f"GPU{g} reserved")
        else:  # CPU run (the demo): host memory of each rank instead
            ax[1, 1].plot(steps, [r["host_rss_gib"][g] for r in rows], label=f"rank {g} host RSS")
    ax[1, 1].set_title("peak memory per step (GiB)")
    ax[1, 1].legend(fontsize=7)
    for a in ax.flat:
        a.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Progress:
    """Progress on rank 0: tqdm's bar on a terminal; where the output is a file or a pipe (a launcher's log), a plain
    line every `every_s` seconds and at the last step instead of the bar's carriage-return redraws."""

    def __init__(self, total: int, start: int, enabled: bool, every_s: float = 30.0, stream=None):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.total, self.start, self.done, self.every_s = total, start, start, every_s
        self.terminal = enabled and self.stream.isatty()
        self.enabled, self.started, self.last = enabled, time.time(), 0.0
        self.bar = tqdm(total=total, initial=start, disable=not self.terminal, dynamic_ncols=True, desc="train",
                        file=self.stream)

    def update(self, row: dict) -> None:
        """After an optimizer step's metrics row."""
        self.done += 1
        if self.terminal:
            self.bar.update(1)
            self.bar.set_postfix(ep=row["epoch"], loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 scale=f"{row['loss_scale']:g}", tok_s=row["tokens_per_s_per_gpu"],
                                 mem=f"{max(row['peak_reserved_gib']):.1f}G")
            return
        now = time.time()
        if self.enabled and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            elapsed = now - self.started
            eta = elapsed / (self.done - self.start) * (self.total - self.done)
            print(f"[train] step {self.done}/{self.total}, epoch {row['epoch']}, loss {row['loss']:.4f}, "
                  f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, ETA {eta / 60:.1f} min", file=self.stream,
                  flush=True)

    def close(self) -> None:
        self.bar.close()
