"""The training loop: set up, iterate, step, log, save. Read it top to bottom; `train()` is the whole job.

DeepSpeed facts this loop relies on: `engine.backward` divides the loss by the accumulation steps and
`engine.step()` must be called after every micro-batch (it only updates at the accumulation boundary,
skips the update on fp16 overflow and steps the scheduler itself). We never zero grads or step the
scheduler by hand.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import latest_resume, load_resume, save_adapter, save_resume
from .collate import collate, pack
from .config import TrainConfig, parse_config
from .data import DataIndex, SampleReader, describe, index_data, resolve_sources, split
from .engine import (check_training_mode, describe_setup, init_process, load_ds_config, loss_scale, precision,
                     prepare_engine, read_ds_config)
from .errors import ChatTSTrainError, CheckpointError, RankError, TrainingError
from .evaluate import evaluate_samples, read_samples, write_report
from .hostmem import host_need_gib, node_memory_gib, peak_rss_gib, rss_gib
from .metrics import MetricsLog, format_summary, gather_named, memory_snapshot, plot, summarise
from .weights import checkpoint_bytes
from .processor import ChatTSProcessor
from .schedule import Schedule


def rank0_print(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def index_on_rank0(cfg: TrainConfig, processor: ChatTSProcessor) -> DataIndex:
    """Rank 0 reads and checks the data once; the others get the index (or the error) from it."""
    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = index_data(resolve_sources(cfg.data, cfg.dataset_dir), processor, cfg.cutoff_len,
                                    cfg.strict_data)
        except Exception as e:  # every rank must raise it, or the others wait here forever
            payload[0] = e
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return payload[0]


def micro_step(engine, batch: dict, token_scale: float) -> tuple[float, int]:
    """Forward, backward and `engine.step()` for one micro-batch. `token_scale` (= accumulation steps x
    world size / answer tokens of the whole optimizer step) makes the gradient that of the mean over all
    answer tokens of the step, across micro-steps and ranks, rather than a mean of per-sample means."""
    check_training_mode(engine.module)
    out = engine(**batch)
    engine.backward(out.loss_sum * token_scale)
    engine.step()
    return out.loss_sum.item(), int(out.num_tokens)


class StopRequest:
    """SIGINT/SIGTERM ask for a clean stop; all ranks agree at the next micro-step boundary."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def agreed(self, device) -> bool:
        t = torch.tensor([float(self.flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def step_token_scale(batches: list[dict], ga: int, world: int, device) -> tuple[float, int]:
    """(token_scale for `micro_step`, answer tokens of the whole optimizer step over all ranks)."""
    counts = torch.tensor([float(sum((b["labels"][:, 1:] != -100).sum() for b in batches))], device=device)
    dist.all_reduce(counts)
    total = int(counts.item())
    return ga * world / max(total, 1), total


def oom_advice(index: DataIndex, ids: np.ndarray, seq_len: int) -> str:
    where = ", ".join(f"{index.sources[index.source[i]].path}:{index.line[i]}" for i in ids)
    return (f"CUDA out of memory at sequence length {seq_len} (sample {where}). Try: parameter offload "
            f"(--offload param), a smaller --cutoff_len, or measure first with benchmarks/memprobe.py "
            f"--seq-len {seq_len}.")


def train(cfg: TrainConfig, step_fn: Callable = micro_step) -> dict:
    """The whole job. `step_fn` is the micro-step (forward, backward, engine.step); tests and profilers pass
    their own wrapper of `micro_step`."""
    # ---- set up -------------------------------------------------------------------------------------
    t_start = time.time()
    read_ds_config(cfg.ds_config)  # a missing or broken file fails here, before any process group starts
    rank, world, device = init_process(cfg.seed, cfg.gpu_memory_cap_gib)
    ds = load_ds_config(cfg.ds_config, world, cfg.micro_batch, cfg.grad_accum, cfg.fp16, cfg.offload)
    mb, ga = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]

    processor = ChatTSProcessor.from_pretrained(cfg.model_path)
    index = index_on_rank0(cfg, processor)
    train_ids, val_ids = split(index, cfg.val_size, cfg.seed)
    if cfg.packing and mb != 1:
        raise TrainingError(f"--packing joins samples into one row per micro-step: set the micro-batch to 1 (got {mb})")
    schedule = Schedule(index, train_ids, cfg.seed, mb, world, ga, pack_to=cfg.cutoff_len if cfg.packing else 0)
    total_steps = schedule.total_steps(cfg.num_epochs, cfg.max_steps)
    micro_batches_per_epoch = len(schedule.epoch_plan(0))
    for d in describe(index):
        rank0_print(f"[data] {d['dataset']}: kept {d['kept']}, dropped {d['dropped'] or 'none'}, "
                    f"seq_len {d['seq_len']}, answer tokens {d['answer_tokens']}")
    if index.problems:
        rank0_print(f"[data] skipped {len(index.problems)} bad samples, e.g. {index.problems[0]} "
                    f"(--strict_data to stop instead)")
    rank0_print(f"[data] {len(train_ids)} train / {len(val_ids)} eval samples in {micro_batches_per_epoch} micro-batches"
                f"{' packed up to ' + str(cfg.cutoff_len) + ' positions' if cfg.packing else ''}; "
                f"{schedule.steps_in_epoch(0)} optimizer steps per epoch of {ga} x {world} micro-batches; "
                f"{total_steps} steps in all")

    # What can fail without the model fails before loading it (minutes for 14B).
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    if cfg.resume and latest_resume(ckpt_root) is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_root} (expected {ckpt_root}/latest)")
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
            json.dump({"train": asdict(cfg), "deepspeed": ds}, f, indent=2)

    report_host_need(cfg.model_path, ds, world)
    engine, hf_ds = prepare_engine(cfg, ds, total_steps)
    setup = describe_setup(engine)
    rss = gather_named({"rss": rss_gib(), "peak": peak_rss_gib()}, device)
    rank0_print(f"[model] {cfg.model_path}: attention {setup['attention']}, dtype {precision(ds)}, "
                f"ZeRO stage {setup['zero_stage']}, offload param {setup['offload_param']} / optimizer "
                f"{bool(ds['zero_optimization'].get('offload_optimizer'))}, trainable "
                f"{setup['trainable_numel'] / 1e6:.2f} M, checkpointed layers {setup['checkpointed_layers']}/"
                f"{setup['decoder_layers']}, loss scale {loss_scale(engine):g}")
    rank0_print("[host] RSS after load per rank: " + ", ".join(
        f"{r['rss']:.1f} GiB (peak {r['peak']:.1f})" for r in rss))
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "setup.json"), "w") as f:
            json.dump({**setup, "host_rss_after_load_gib": [round(r["rss"], 2) for r in rss],
                       "host_peak_after_load_gib": [round(r["peak"], 2) for r in rss]}, f, indent=2)

    start_step = 0
    if cfg.resume:
        start_step, _ = load_resume(engine, ckpt_root)
        engine.train()
        rank0_print(f"[resume] continuing at optimizer step {start_step}")
    reader = SampleReader(index, processor)
    pad_id = processor.tokenizer.pad_token_id
    log = MetricsLog(cfg.output_dir, rank == 0, cfg.tensorboard, resume_step=start_step if cfg.resume else None)
    stop = StopRequest()
    batch_of = pack if cfg.packing else collate
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, dynamic_ncols=True, desc="train")
    bad_steps, first_step_s, samples_seen = 0, None, 0

    # ---- iterate ------------------------------------------------------------------------------------
    for step in range(start_step, total_steps):
        plan = schedule.micro_batches(step, rank)
        batches = [batch_of([reader[int(i)] for i in ids], pad_id) for ids in plan]
        # Answer tokens of the whole optimizer step, over all ranks: the loss is their mean.
        token_scale, answer_tokens = step_token_scale(batches, ga, world, device)
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for ids, batch in zip(plan, batches):
            if stop.agreed(device):
                save_resume(engine, ckpt_root, step, cfg.keep_checkpoints)
                rank0_print(f"\n[stop] signal received: saved a resume checkpoint at step {step} in {ckpt_root}; "
                            f"continue with --resume")
                bar.close()
                return {"stopped_at": step}
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                part, _ = step_fn(engine, batch, token_scale)
            except torch.OutOfMemoryError as e:
                raise RankError(oom_advice(index, ids, batch["input_ids"].shape[1])) from e
            except Exception as e:
                if "loss scale already at minimum" not in str(e):
                    raise
                save_resume(engine, ckpt_root, step, cfg.keep_checkpoints)
                raise TrainingError(f"fp16 loss scale reached its minimum at step {step}: gradients overflow "
                                    f"even unscaled. Saved a checkpoint in {ckpt_root}. Lower the learning rate, "
                                    f"check the data for extreme values, or train in fp32.") from e
            loss_sum += part
            tokens += int(batch["input_ids"].numel()) if cfg.packing else int(batch["attention_mask"].sum())
        step_time = time.perf_counter() - t0
        first_step_s = first_step_s or (time.time() - t_start)

        # ---- log ------------------------------------------------------------------------------------
        mem = memory_snapshot(device)
        per_rank = gather_named({"loss_sum": loss_sum, "tokens": tokens, "allocated": mem["allocated"],
                                 "reserved": mem["reserved"], "active": mem["active"], "host": rss_gib(),
                                 "host_peak": mem["host"], "samples": sum(len(ids) for ids in plan),
                                 "seq_len": max(b["input_ids"].shape[1] for b in batches)}, device)
        samples_seen += int(sum(r["samples"] for r in per_rank))
        step_tokens = sum(r["tokens"] for r in per_rank)
        loss = sum(r["loss_sum"] for r in per_rank) / max(answer_tokens, 1)
        bad_steps = bad_steps + 1 if not math.isfinite(loss) else 0
        row = {
            "step": step + 1, "epoch": round(schedule.epoch_progress(step), 3), "loss": loss, "lr": engine.get_lr()[0],
            "loss_scale": loss_scale(engine), "skipped": int(not engine.was_step_applied()),
            "grad_norm": _finite_or_none(engine.get_global_grad_norm()), "tokens": int(step_tokens),
            "answer_tokens": answer_tokens, "max_seq_len": int(max(r["seq_len"] for r in per_rank)),
            "step_time_s": round(step_time, 4), "tokens_per_s_per_gpu": round(step_tokens / step_time / world, 1),
            **{f"peak_{k}_gib": [round(r[k], 3) for r in per_rank] for k in ("allocated", "reserved", "active")},
            "host_rss_gib": [round(r["host"], 2) for r in per_rank],
            "host_peak_gib": [round(r["host_peak"], 2) for r in per_rank],
        }
        log.log(row)
        bar.update(1)
        bar.set_postfix(ep=row["epoch"], loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", scale=f"{row['loss_scale']:g}",
                        tok_s=row["tokens_per_s_per_gpu"], mem=f"{max(row['peak_reserved_gib']):.1f}G")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # so each row holds that step's peak
        if bad_steps >= cfg.max_bad_steps:
            save_resume(engine, ckpt_root, step + 1, cfg.keep_checkpoints)
            raise TrainingError(f"loss was NaN/inf for {bad_steps} steps in a row (step {step + 1}); saved a "
                                f"checkpoint in {ckpt_root}. Lower the learning rate or check the data.")

        # ---- save -----------------------------------------------------------------------------------
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total_steps:
            save_resume(engine, ckpt_root, step + 1, cfg.keep_checkpoints)

    bar.close()
    save_adapter(engine.module, os.path.join(cfg.output_dir, "adapter"))
    save_resume(engine, ckpt_root, total_steps, cfg.keep_checkpoints)
    log.close()
    if cfg.eval_at_end and len(val_ids):
        engine.eval()
        rows = evaluate_samples(engine.module, processor, read_samples(index, val_ids), device,
                                max_new_tokens=cfg.eval_max_new_tokens, rank=rank, world=world)
        engine.train()
        if rank == 0:
            write_report(rows, os.path.join(cfg.output_dir, "eval"))
    summary = summarise(log.rows, time.time() - t_start, samples_seen, first_step_s)
    if rank == 0:
        summary["adapter"] = os.path.join(cfg.output_dir, "adapter")
        if cfg.plot:
            summary["plot"] = plot(log.rows, os.path.join(cfg.output_dir, "training.png"))
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        rank0_print(format_summary(summary))
    del hf_ds
    return summary


def report_host_need(model_path: str, ds: dict, world: int) -> None:
    """Say what host RAM the run needs before the (minutes-long) load, and warn when the node lacks it."""
    need = host_need_gib(checkpoint_bytes(model_path), ds, world)
    available, total = node_memory_gib()
    pinned = (f"{need['pinned_partition_gib']:.1f} GiB of it the pinned partition of the frozen weights"
              if need["pinned_partition_gib"] else "no parameter offload, so no pinned weights")
    rank0_print(f"[host] this node needs ~{need['node_gib']:.0f} GiB of RAM: {need['ranks_on_node']} ranks x "
                f"~{need['per_rank_gib']:.1f} GiB ({pinned}); available {available:.0f} of {total:.0f} GiB")
    if need["node_gib"] > available:
        # A warning, not a refusal: memory-ballooned VMs report less than they can grow to.
        rank0_print(f"[host] warning: that is more than the {available:.0f} GiB available; the load may be OOM-killed. "
                    f"Options: --offload none (check it fits: benchmarks/memprobe.py --no-offload), more GPUs, "
                    f"or a machine with more RAM")


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
    try:
        train(parse_config(TrainConfig, argv, description="LoRA fine-tuning of ChatTS with DeepSpeed"), step_fn)
    except ChatTSTrainError as e:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if isinstance(e, RankError) and world > 1:
            print(f"error (rank {rank} of {world}): {e}", file=sys.stderr, flush=True)
        elif rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:
        if not (dist.is_initialized() and is_peer_failure(e)):
            raise
        print(f"error (rank {dist.get_rank()}): stopped because another rank failed (its error is printed above)",
              file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
