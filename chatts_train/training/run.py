"""Everything of a training run before its first step (`setup`) and after its last (`finish`): `train()`
in loop.py is what happens in between."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .checkpoint import LATEST, latest_resume, load_resume
from .config import TrainConfig, check_config
from ..data.indexing import DataIndex, describe, index_data, resolve_sources, split
from ..fit.dsconfig import precision, run_ds_config, run_precision
from .engine import allocator_note, describe_setup, init_process, loss_scale, prepare_engine
from ..errors import CheckpointError, ConfigError
from ..use.evaluate import evaluate_samples, format_before_after, read_samples, score_by_dataset, write_report
from ..fit.compiled_layers import compile_report
from ..fit.hostmem import host_need_gib, node_memory_gib, peak_rss_gib, rss_gib
from ..fit.lean_activations import fusing_unavailable
from .metrics import format_run_summary, gather_named, memory_snapshot, plot, summarise_run
from ..model.modeling import ChatTSConfig, check_checkpoint
from ..fit.plan import (Plan, Shape, apply_to_ds, next_down, pinned_note, pins_of, plan_run, predict_peak_gib,
                        run_cap_gib)
from ..model.processor import ChatTSProcessor
from ..ranks import ROLL_CALL, rank0_print, sign_in
from ..formats.run_record import RECORD, data_files, read_run_record, write_run_record
from ..data.sampler import Sampler
from ..model.shards import checkpoint_bytes, largest_shard_bytes


@dataclass
class Run:
    """The pieces of one training run, as `setup` hands them to the loop."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    ds: dict
    processor: ChatTSProcessor
    index: DataIndex
    val_ids: np.ndarray
    sampler: Sampler
    total_steps: int
    engine: object  # deepspeed.DeepSpeedEngine
    hf_ds: object  # keeps transformers' ZeRO-3 config alive as long as the engine
    start_step: int
    started: float
    plan: Plan
    after_oom: str  # what to run instead when this plan runs out of memory

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")


def setup(cfg: TrainConfig) -> Run:
    """Check the configuration, start the process group, index the data, write the run record, load the
    model into a training engine and resume. What can fail without the model fails before loading it."""
    started = time.time()
    check_config(cfg)  # every problem at once, before any process group
    rank, world, device = init_process(cfg.seed, run_cap_gib(cfg.card, cfg.gpu_memory_cap_gib))
    config = check_checkpoint(cfg.model_path)
    ds = run_ds_config(cfg, world, config.hidden_size, run_precision(cfg.fp16, cfg.bf16, cfg.card))
    if precision(ds) == torch.float16 and not get_accelerator().is_fp16_supported():
        raise ConfigError([f"fp16 is on, but this machine's accelerator ({get_accelerator().device_name()}) has no "
                           f"fp16: pass --fp16 false"])
    mb, ga = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    processor = ChatTSProcessor.from_pretrained(cfg.model_path)
    index = index_on_rank0(cfg, processor)
    train_ids, val_ids = split(index, cfg.val_size, cfg.seed)
    sampler = Sampler(index, train_ids, cfg.seed, mb, world, ga, pack_to=cfg.cutoff_len if cfg.packing else 0)
    total_steps = sampler.total_steps(cfg.num_epochs, cfg.max_steps)
    report_data(index, len(train_ids), len(val_ids), sampler, cfg, total_steps)

    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    record = None
    if cfg.resume:
        found = latest_resume(ckpt_root)  # a missing or broken checkpoint fails here, before the model loads
        if not os.path.isfile(os.path.join(ckpt_root, LATEST)):
            rank0_print(f"[resume] {ckpt_root} has no `{LATEST}` file: resuming from the newest complete checkpoint, "
                        f"{os.path.basename(found)}")
        if os.path.isfile(os.path.join(cfg.output_dir, RECORD)):
            record = read_run_record(cfg.output_dir)
            changes = resume_changes(record, cfg, ds, world, index)
            if changes:
                raise CheckpointError(f"--resume would not continue the same run: {'; '.join(changes)}. Resume "
                                      f"with the run's settings, or start a new run in another --output_dir")
    plan, after_oom = decide_plan(cfg, ds, config, world, device, sampler.longest(total_steps), total_steps * ga, record)
    apply_to_ds(plan, ds)
    if rank == 0:
        if cfg.overwrite_output_dir and not cfg.resume:
            shutil.rmtree(ckpt_root, ignore_errors=True)  # or rotation would mix the old run's steps with ours
        os.makedirs(cfg.output_dir, exist_ok=True)
        shutil.rmtree(os.path.join(cfg.output_dir, ROLL_CALL), ignore_errors=True)  # an earlier run's
        if not cfg.resume:
            write_run_record(cfg, ds, world, index, val_ids, plan.as_dict())
    dist.barrier()
    sign_in(cfg.output_dir, rank)

    report_host_need(cfg.model_path, ds, world)
    engine, hf_ds = prepare_engine(cfg, ds, total_steps, plan)
    start_step = 0
    if cfg.resume:
        start_step, _ = load_resume(engine, ckpt_root)
        engine.train()
        rank0_print(f"[resume] continuing at optimizer step {start_step}")
    report_model(cfg, ds, plan, engine, rank, device)  # after the resume: a failed start leaves setup.json as it was
    return Run(cfg, rank, world, device, ds, processor, index, val_ids, sampler, total_steps, engine, hf_ds,
               start_step, started, plan, after_oom)


def decide_plan(cfg: TrainConfig, ds: dict, config: ChatTSConfig, world: int, device: torch.device, positions: int,
                micro_steps: int, record: Optional[dict] = None) -> tuple[Plan, str]:
    """The run's plan, printed in one line before the model loads, and what to try if it runs out of memory.
    A resumed run keeps the plan it started with (its checkpoint's layout depends on the ZeRO stage)."""
    plan, ranked, cards = plan_run(cfg, ds, config, positions, world, device, micro_steps)
    if record and record.get("plan"):
        recorded = Plan(**record["plan"])
        clash = {k: v for k, v in pins_of(cfg, ds, config.num_hidden_layers).pinned().items()
                 if getattr(recorded, k) != v}
        if clash:
            raise CheckpointError(f"--resume: the run started with the plan '{recorded.line()}'; its checkpoint "
                                  f"needs it, so {', '.join(f'{k}={v}' for k, v in clash.items())} cannot change")
        plan = recorded
    chosen = next((c for c in ranked if c.plan == plan), None)
    each = "GPU" if cards.kind == "cuda" else "process"
    rank0_print(f"[plan] {plan.line(each)}" + (f" (predicted peak {chosen.peak_gib:.1f} GiB per {each} for the longest "
                                            f"micro-step, {positions} positions)" if chosen else " (resumed)"))
    note = pinned_note(plan)
    if note and not (record and record.get("plan")):  # a resumed run cannot change it
        rank0_print(f"[plan] note: {note}")
    if chosen and not chosen.fits:
        rank0_print(f"[plan] warning: predicted to need {chosen.need_gib:.1f} GiB per {each} of "
                    f"{cards.usable_gib:.1f} usable; the first micro-step (the longest) will tell. The pins leave "
                    f"nothing that fits: `chatts-train plan` with the same options lists the candidates")
    peak = chosen.peak_gib if chosen else predict_peak_gib(plan, Shape.of(config, precision(ds).itemsize), world,
                                                             positions)
    down = next_down(plan, peak, ranked, config.num_hidden_layers)
    after = (f"the next plan down is '{down.line()}' ({down.flags()})" if down else
             "no smaller plan exists: use more GPUs or a shorter --cutoff_len")
    return plan, after


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


def report_data(index: DataIndex, n_train: int, n_val: int, sampler: Sampler, cfg: TrainConfig, total_steps: int) -> None:
    for d in describe(index):
        rank0_print(f"[data] {d['dataset']}: kept {d['kept']}, dropped {d['dropped'] or 'none'}, "
                    f"seq_len {d['seq_len']}, answer tokens {d['answer_tokens']}")
    if index.problems:
        rank0_print(f"[data] skipped {len(index.problems)} bad samples, e.g. {index.problems[0]} "
                    f"(--strict_data to stop instead)")
    rank0_print(f"[data] {n_train} train / {n_val} eval samples in {len(sampler.epoch_plan(0))} micro-batches"
                f"{' packed up to ' + str(cfg.cutoff_len) + ' positions' if cfg.packing else ''}; "
                f"{sampler.steps_in_epoch(0)} optimizer steps per epoch of {sampler.grad_accum} x {sampler.world} "
                f"micro-batches; {total_steps} steps in all")


def report_host_need(model_path: str, ds: dict, world: int) -> None:
    """Say what host RAM the run needs before the (minutes-long) load, and warn when the node lacks it."""
    need = host_need_gib(checkpoint_bytes(model_path), ds, world, largest_shard_bytes(model_path))
    available, total = node_memory_gib()
    pinned = (f"{need['pinned_partition_gib']:.1f} GiB of it the pinned partition of the frozen weights"
              if need["pinned_partition_gib"] else "no parameter offload, so no pinned weights")
    rank0_print(f"[host] this node needs ~{need['node_gib']:.0f} GiB of RAM: {need['ranks_on_node']} ranks x "
                f"~{need['per_rank_gib']:.1f} GiB ({pinned}); available {available:.0f} of {total:.0f} GiB")
    if need["node_gib"] > available:
        # A warning, not a refusal: memory-ballooned VMs report less than they can grow to.
        rank0_print(f"[host] warning: that is more than the {available:.0f} GiB available; the load may be OOM-killed. "
                    f"Options: --offload none (check it fits: benchmarks/memprobe.py --offload none), more GPUs, "
                    f"or a machine with more RAM")


def report_model(cfg: TrainConfig, ds: dict, plan: Plan, engine, rank: int, device: torch.device) -> None:
    """What the step will run with, on screen and in `setup.json`, with each rank's RSS after loading."""
    setup = describe_setup(engine)
    set_up = memory_snapshot(device)["allocated"]
    rss = gather_named({"rss": rss_gib(), "peak": peak_rss_gib(), "gpu": set_up}, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the first step's row then holds that step's peak alone
    kernel = f" on SDPA's {setup['sdpa_kernel']} kernel" if setup["sdpa_kernel"] else ""
    rank0_print(f"[model] {cfg.model_path}: attention {setup['attention']}{kernel}, dtype {precision(ds)}, "
                f"ZeRO stage {setup['zero_stage']}, offload param {setup['offload_param']} / optimizer "
                f"{bool(ds['zero_optimization'].get('offload_optimizer'))}, trainable "
                f"{setup['trainable_numel'] / 1e6:.2f} M, checkpointed layers {setup['checkpointed_layers']}/"
                f"{setup['decoder_layers']}, loss scale {loss_scale(engine):g}")
    if setup["compiled_layers"]:
        rank0_print(f"[model] {setup['compiled_layers']} decoder layers compiled during the first micro-step (~13 s "
                    f"on 1 x H200 with nothing cached, ~5 s from Inductor's caches of an earlier run; "
                    f"--compile_layers false runs them op by op)")
    elif device.type == "cuda" and cfg.lean_activations and cfg.fused_kernels and not setup["fused_kernel_modules"]:
        why = fusing_unavailable() or f"a {plan.card} runs them op by op (fit/cards.py: compiled kernels need sm80+)"
        rank0_print(f"[model] fused kernels off: {why}")
    if device.type == "cuda" and setup["sdpa_kernel"] == "math":
        rank0_print("[model] WARNING: training attention runs SDPA's math kernel, which builds every head's "
                    "[positions x positions] scores: several times slower and GiBs more at 4,096 positions. Leave "
                    "--attn_implementation unset (K/V are then expanded for the memory-efficient kernel on cards "
                    "without flash) and check that torch.backends.cuda.enable_mem_efficient_sdp is not switched off")
    note = allocator_note(plan.gpu_memory_cap_gib)
    if device.type == "cuda" and note:
        rank0_print(f"[model] {note}")
    rank0_print("[host] RSS after load per rank: " + ", ".join(f"{r['rss']:.1f} GiB (peak {r['peak']:.1f})" for r in rss))
    if device.type == "cuda":
        rank0_print("[model] GPU memory of set-up (peak allocated per rank): " + ", ".join(f"{r['gpu']:.2f} GiB" for r in rss))
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "setup.json"), "w") as f:
            json.dump({**setup, "host_rss_after_load_gib": [round(r["rss"], 2) for r in rss],
                       "host_peak_after_load_gib": [round(r["peak"], 2) for r in rss],
                       "setup_peak_allocated_gib": [round(r["gpu"], 3) for r in rss]}, f, indent=2)


def score_held_out(run: Run) -> list[dict]:
    """Generate on the held-out split and score it; every rank takes part (ZeRO-3), rank 0 gets the rows."""
    run.engine.eval()
    rows = evaluate_samples(run.engine.module, run.processor, read_samples(run.index, run.val_ids), run.device,
                            max_new_tokens=run.cfg.eval_max_new_tokens, rank=run.rank, world=run.world)
    run.engine.train()
    return rows


def first_step_done(run: Run, step_s: float) -> float:
    """Seconds from set-up's start to the end of the first optimizer step, said with what compiling took so far
    (set-up's fused kernels and the first step's layers)."""
    since_start = time.time() - run.started
    compiled = compile_report()
    if compiled:
        cache = ", ".join(f"{n} {k}" for k, n in compiled["fx_cache"].items()) or "not used"
        graphs = f"{compiled['graphs']} graph{'s' * (compiled['graphs'] != 1)}"
        rank0_print(f"[time] first step {step_s:.1f} s; torch.compile so far {compiled['forward_s'] + compiled['backward_s']:.1f} s "
                    f"({graphs}; Inductor's cache on disk: {cache}); set-up began {since_start:.0f} s ago")
    return since_start


def finish(run: Run, rows: list[dict], samples_seen: int, first_step_s: Optional[float],
           scores_before: Optional[list[dict]] = None) -> dict:
    """After the last step: the held-out score (--eval_at_end, beside --eval_at_start's), the summary, the plot."""
    cfg = run.cfg
    summary = {}
    if cfg.eval_at_end and len(run.val_ids):
        scored = score_held_out(run)
        if run.rank == 0:
            summary["held_out_after"] = write_report(scored, os.path.join(cfg.output_dir, "eval"))["all"]
            if scores_before:
                before = score_by_dataset(scores_before)
                summary["held_out_before"] = before["all"]
                rank0_print("\n[eval] held-out scores before and after training:\n"
                            + format_before_after(before, score_by_dataset(scored)))
    summary = {**summarise_run(rows, time.time() - run.started, samples_seen, first_step_s), **summary}
    compiled = compile_report()
    if compiled:
        summary["compiled"] = compiled
    if run.rank == 0:
        summary["adapter"] = os.path.join(cfg.output_dir, "adapter")
        if cfg.plot:
            summary["plot"] = plot(rows, os.path.join(cfg.output_dir, "training.png"))
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        rank0_print(format_run_summary(summary))
    return summary


def resume_changes(record: dict, cfg: TrainConfig, ds: dict, world: int, index: DataIndex) -> list[str]:
    """What differs from the run being resumed in ways that would change its data order or steps."""
    was = record["train"]
    changes = []
    if record["world_size"] != world:
        changes.append(f"world size {record['world_size']} -> {world}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if record["deepspeed"][key] != ds[key]:
            changes.append(f"{key} {record['deepspeed'][key]} -> {ds[key]}")
    for key in ("seed", "data", "cutoff_len", "val_size", "packing", "lora_rank", "lora_alpha", "lora_targets",
                "lora_encoder", "train_encoder"):
        if was[key] != getattr(cfg, key):
            changes.append(f"--{key} {was[key]!r} -> {getattr(cfg, key)!r}")
    now = data_files(index)
    for path, stat in record["data_files"].items():
        if now.get(path) != stat:
            changes.append(f"data file {path} changed since the run started (size or modification time)")
    return changes
