"""The training loop: set up, iterate, step, log, save. Read it top to bottom; `train()` is the whole job.

DeepSpeed facts this loop relies on: `engine.backward` divides the loss by the accumulation steps and
`engine.step()` must be called after every micro-batch (it only updates at the accumulation boundary,
skips the update on fp16 overflow and steps the scheduler itself). We never zero grads or step the
scheduler by hand.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..formats.adapter import save_adapter
from .checkpoint import save_resume
from ..fit.compiled_layers import compile_failure
from ..model.batching import collate, pack
from .config import TrainConfig, parse_config
from ..data.indexing import SampleReader
from .engine import check_training_mode, loss_scale
from ..errors import ChatTSTrainError, DataError, RankError, TrainingError
from ..fit.hostmem import rss_gib
from .metrics import MetricsLog, Progress, gather_named, memory_snapshot
from ..ranks import LauncherWatch, killed_ranks, rank, rank0_print, sign_out
from .run import Run, finish, first_step_done, score_held_out, setup
from ..formats.run_record import sample_names
from ..tokens import IGNORE_INDEX


def micro_step(engine, batch: dict, token_scale: float) -> torch.Tensor:
    """Forward, backward and `engine.step()` for one micro-batch; returns the summed loss, on the device (read
    it once per optimizer step: each read waits for the GPU, and the host then no longer runs ahead of it).
    `token_scale` (= accumulation steps x world size / answer tokens of the whole optimizer step) makes the
    gradient that of the mean over all answer tokens of the step, across micro-steps and ranks, rather than a
    mean of per-sample means."""
    check_training_mode(engine.module)
    out = engine(**batch)
    engine.backward(out.loss_sum * token_scale)
    engine.step()
    return out.loss_sum.detach()


class StopRequest:
    """SIGINT/SIGTERM, or the DeepSpeed launcher gone, ask for a clean stop; all ranks agree on it at the next
    optimizer step's start (step_token_scale) and save a resume checkpoint."""

    def __init__(self):
        self.flag = self.signalled = False
        self.launcher = LauncherWatch()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = self.signalled = True

    def asked(self) -> bool:
        self.flag = self.flag or self.launcher.gone()
        return self.flag


def step_token_scale(batches: list[dict], ga: int, world: int, device, stop: bool = False) -> tuple[float, int, bool]:
    """(token_scale for `micro_step`, answer tokens of the whole optimizer step over all ranks, whether any rank
    asks to stop). Counted from the host's batches and agreed in one all-reduce before the step's micro-steps,
    so these run without the host waiting on the GPU."""
    mine = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    t = torch.tensor([float(mine), float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total, stops = (int(v) for v in t.tolist())
    return ga * world / max(total, 1), total, stops > 0


def train(cfg: TrainConfig, step_fn: Callable = micro_step) -> dict:
    """The whole job. `step_fn` is the micro-step (forward, backward, engine.step); tests and profilers pass
    their own wrapper of `micro_step`."""
    run = setup(cfg)
    engine, device, world = run.engine, run.device, run.world
    scores_before = score_held_out(run) if cfg.eval_at_start and len(run.val_ids) and not cfg.resume else None
    reader, pad_id = SampleReader(run.index, run.processor), run.processor.tokenizer.pad_token_id
    log = MetricsLog(cfg.output_dir, run.rank == 0, cfg.tensorboard, resume_step=run.start_step if cfg.resume else None)
    stop, failures = StopRequest(), Failures(run)
    batch_of = functools.partial(pack if cfg.packing else collate, multiple=run.plan.pad_to)
    bar = Progress(run.total_steps, run.start_step, run.rank == 0)
    first_step_s, samples_seen = None, 0

    # ---- iterate ------------------------------------------------------------------------------------
    for step in range(run.start_step, run.total_steps):
        t0 = time.perf_counter()
        plan = run.sampler.micro_batches(step, run.rank)
        try:
            samples = [[reader[int(i)] for i in ids] for ids in plan]
        except DataError as e:  # read on this rank only, so this rank reports it
            raise RankError(str(e)) from None
        batches = [batch_of(group, pad_id) for group in samples]
        tokens = sum(len(s) for group in samples for s in group)  # positions without the pads
        # Answer tokens of the whole optimizer step, over all ranks (the loss is their mean), and a stop request
        token_scale, answer_tokens, stopping = step_token_scale(batches, run.sampler.grad_accum, world, device,
                                                                stop.asked())
        if stopping:
            save_resume(engine, run.ckpt_root, step, cfg.keep_checkpoints)
            why = "signal received" if stop.signalled else "the launcher is gone"
            rank0_print(f"\n[stop] {why}: saved a resume checkpoint at step {step} in {run.ckpt_root}; "
                        f"continue with --resume")
            bar.close()
            return {"stopped_at": step}
        if device.type == "cuda":  # a copy from pageable memory waits for the GPU's queue to drain; pinned, for nothing
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        losses = []
        for ids, batch in zip(plan, batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with failures.watch(step, ids, batch["input_ids"].shape[1]):
                losses.append(step_fn(engine, batch, token_scale))
        loss_sum = float(torch.stack(losses).sum())  # the step's one wait for the GPU
        step_time = time.perf_counter() - t0
        first_step_s = first_step_s or first_step_done(run, step_time)

        # ---- log ------------------------------------------------------------------------------------
        row = step_row(run, step, batches, loss_sum, tokens, answer_tokens, step_time, sum(len(i) for i in plan))
        samples_seen += row.pop("samples")
        log.log(row)
        bar.update(row)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # so each row holds that step's peak
        failures.check_loss(step, row["loss"])

        # ---- save -----------------------------------------------------------------------------------
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < run.total_steps:
            save_resume(engine, run.ckpt_root, step + 1, cfg.keep_checkpoints)

    bar.close()
    save_adapter(engine.module, os.path.join(cfg.output_dir, "adapter"))
    save_resume(engine, run.ckpt_root, run.total_steps, cfg.keep_checkpoints)
    log.close()
    return finish(run, log.rows, samples_seen, first_step_s, scores_before)


def step_row(run: Run, step: int, batches: list[dict], loss_sum: float, tokens: int, answer_tokens: int,
             step_time: float, samples: int) -> dict:
    """The metrics line of one optimizer step, from every rank's numbers (gathered by name)."""
    engine, mem = run.engine, memory_snapshot(run.device)
    per_rank = gather_named({"loss_sum": loss_sum, "tokens": tokens, "allocated": mem["allocated"],
                             "reserved": mem["reserved"], "active": mem["active"], "host": rss_gib(),
                             "host_peak": mem["host"], "samples": samples,
                             "seq_len": max(b["input_ids"].shape[1] for b in batches)}, run.device)
    step_tokens = sum(r["tokens"] for r in per_rank)
    return {
        "step": step + 1, "epoch": round(run.sampler.epoch_progress(step), 3),
        "loss": sum(r["loss_sum"] for r in per_rank) / max(answer_tokens, 1), "lr": engine.get_lr()[0],
        "loss_scale": loss_scale(engine), "skipped": int(not engine.was_step_applied()),
        "grad_norm": _finite_or_none(engine.get_global_grad_norm()), "tokens": int(step_tokens),
        "answer_tokens": answer_tokens, "max_seq_len": int(max(r["seq_len"] for r in per_rank)),
        "step_time_s": round(step_time, 4), "tokens_per_s_per_gpu": round(step_tokens / step_time / run.world, 1),
        **{f"peak_{k}_gib": [round(r[k], 3) for r in per_rank] for k in ("allocated", "reserved", "active")},
        "host_rss_gib": [round(r["host"], 2) for r in per_rank],
        "host_peak_gib": [round(r["host_peak"], 2) for r in per_rank],
        "samples": int(sum(r["samples"] for r in per_rank)),
    }


class Failures:
    """The three ways a run stops itself, each with a message that says what to do and, where the state is
    still good, a checkpoint first: out of memory (that rank's own error), the fp16 loss scale at its
    minimum, and a non-finite loss for `max_bad_steps` steps in a row."""

    def __init__(self, run: Run):
        self.run, self.bad_steps = run, 0

    @contextmanager
    def watch(self, step: int, ids, seq_len: int):
        try:
            yield
        except torch.OutOfMemoryError as e:
            where = ", ".join(sample_names(self.run.index, ids))
            raise RankError(f"CUDA out of memory at sequence length {seq_len} (sample {where}) under the plan "
                            f"'{self.run.plan.line()}': {self.run.after_oom}; or a smaller --cutoff_len. "
                            f"memprobe measures a plan first: benchmarks/memprobe.py --seq_len {seq_len}.") from e
        except Exception as e:
            if compile_failure(e):
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise TrainingError(f"compiling the decoder layers failed ({type(e).__name__}: {first}); run with "
                                    f"--compile_layers false: the same step, op by op") from e
            if "loss scale already at minimum" not in str(e):
                raise
            self._save(step)
            raise TrainingError(f"fp16 loss scale reached its minimum at step {step}: gradients overflow even "
                                f"unscaled. Saved a checkpoint in {self.run.ckpt_root}. Lower the learning rate, "
                                f"check the data for extreme values, or train in fp32.") from e

    def check_loss(self, step: int, loss: float) -> None:
        self.bad_steps = self.bad_steps + 1 if not math.isfinite(loss) else 0
        if self.bad_steps >= self.run.cfg.max_bad_steps:
            self._save(step + 1)
            raise TrainingError(f"loss was NaN/inf for {self.bad_steps} steps in a row (step {step + 1}); saved a "
                                f"checkpoint in {self.run.ckpt_root}. Lower the learning rate or check the data.")

    def _save(self, step: int) -> None:
        save_resume(self.run.engine, self.run.ckpt_root, step, self.run.cfg.keep_checkpoints)


def _finite_or_none(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def is_peer_failure(e: BaseException) -> bool:
    """The symptom a rank sees when another rank died: its collective loses the connection."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def main(argv: Optional[list[str]] = None, step_fn: Callable = micro_step) -> None:
    """Entry point of `launch.sh` / `chatts-train train`. Errors are printed once, without a traceback: one
    that every rank raised by rank 0, one rank's own failure by that rank, with its number; a rank that only
    lost its peer says so in one line instead of a traceback."""
    cfg = None
    try:
        cfg = parse_config(TrainConfig, argv)
        train(cfg, step_fn)
    except ChatTSTrainError as e:
        me, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if isinstance(e, RankError) and world > 1:
            print(f"error (rank {me} of {world}): {e}", file=sys.stderr, flush=True)
        elif me == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:
        if not (dist.is_initialized() and is_peer_failure(e)):
            raise
        resume = f"; continue from {cfg.output_dir}/checkpoints with --resume" if cfg else ""
        killed = killed_ranks(cfg.output_dir) if cfg else []
        why = (f"{', '.join(killed)} was killed without an error of its own (SIGKILL: often the kernel's out-of-"
               f"memory killer when host RAM runs out; see `dmesg`)" if killed else
               "another rank failed (its own error, if it could print one, is above; the launcher names its exit "
               "code)")
        print(f"error (rank {dist.get_rank()}): stopped because {why}{resume}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        if cfg:
            sign_out(cfg.output_dir, rank())


if __name__ == "__main__":
    main()
