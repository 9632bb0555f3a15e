"""Measure per-GPU memory and speed of the real training step, and say whether CPU offload can go.

    python benchmarks/memprobe.py --offload none                  # ChatTS-14B-0801 shape, 4096 tokens, 2 GPUs
    python benchmarks/memprobe.py --offload param --gpu_memory_cap_gib 22 --json
    python benchmarks/memprobe.py --model_path /models/ChatTS-14B --seq_len 8192
    python benchmarks/memprobe.py --card 2080ti --emulate_world 2   # one rank of 2 x 2080 Ti, played by this GPU
    python benchmarks/memprobe.py --offload none --baseline hf --profile prof/   # the usual recipe, then ours

Every training option means here what it means in training (`python -m chatts_train --help`: --model_path,
--ds_config, --zero_stage, --offload, --recompute_layers, --gather_whole_layers, --checkpoints_on_cpu,
--compile_layers, --lean_activations, --fused_kernels, --gpu_memory_cap_gib, --card, --grad_accum, --data, ...);
the options below are the probe's own. Runs what `train()` runs: its set-up (`init_process`, `run_ds_config`, the
plan, `prepare_engine`) and its micro-step and token scale, for a few micro-steps and at least one optimizer step
on one worst-case sequence (text + 5000-point series, as in the users' data). A checkpoint at --model_path is
loaded as the job loads it; where there is none, the shape is built from config alone (`--release`, or
`--shape_config FILE`), without weights (values don't matter for memory or speed). An OOM is a result, not a crash.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from instruments import (GiB, DeviceSampler, PhasePeaks, count_traffic, kernel_budget, memory, outside_allocator_gib,
                         start_profile, steady_median, write_kernel_table)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@dataclass
class Probe:
    """memprobe's own options, beside training's."""

    seq_len: int = 4096  # the worst-case sequence (with --data: the longest kept sample)
    also_seq_len: str = ""  # comma-separated lengths measured first with the same engine and plan (the memory model's calibration)
    pack: str = ""  # comma-separated sample lengths packed into one micro-step (e.g. 1432,1432), instead of --seq_len
    num_gpus: int = 2
    emulate_world: Optional[int] = None  # one process as rank 0 of N (fake collectives): one rank of an N-GPU plan, no link time
    release: str = "0801"  # the 14B shape to build where --model_path holds no checkpoint (0801 or legacy)
    shape_config: Optional[str] = None  # build this config.json's shape without weights (instead of --release)
    steps: int = 2  # optimizer steps to run (the first one warms up); micro-steps each: --grad_accum (default 4)
    budget_gib: float = 20.0  # offload can go under this device-level peak (GiB)
    samples: int = 421  # for the job-time estimate and the plan's compile choice (with --num_epochs)
    compare_offload: Optional[str] = None  # a second probe with this offload; reports the step-time ratio
    zero: list[str] = field(default_factory=list)  # zero_optimization overrides KEY=VALUE, e.g. stage3_max_live_parameters=3e8
    baseline: Optional[str] = None  # hf: first the usual recipe (full-vocabulary loss, LLaMA-Factory's ZeRO-3 file), then ours
    profile: Optional[str] = None  # profile one steady micro-step on rank 0: its time budget, the kernel table in this folder
    phases: bool = False  # the peak allocated inside forward, backward and step (resets the peak counters)
    sdpa_cudnn: bool = False  # an A/B only: SDPA's cuDNN kernel back on (the job leaves it off: it plans every new length)
    write_config: Optional[str] = None  # where to write the verdict's DeepSpeed config
    json: bool = False
    recipe: str = "ours"  # (internal) ours or hf
    worker: Optional[int] = None  # (internal) this process is that rank
    out: Optional[str] = None  # (internal) where workers write their reports
    t0: Optional[float] = None  # (internal) when the probe started


def parse(argv=None):
    """(TrainConfig, Probe) from the command line: training's options and the probe's own, one parser."""
    from chatts_train.training.config import TrainConfig, parse_config

    cfg, a = parse_config((TrainConfig, Probe), argv)
    if not os.path.isfile(cfg.ds_config):  # the project's file wherever the probe runs from
        cfg = replace(cfg, ds_config=os.path.join(ROOT, "ds_config.json"))
    return cfg, a


def has_checkpoint(cfg) -> bool:
    return os.path.isfile(os.path.join(cfg.model_path, "config.json"))


# ---------------------------------------------------------------------------------------------- worker

def probe_batch(seq_len: int, spec, vocab: int, answer: int = 64, seed: int = 0):
    """One sample of `seq_len` positions shaped like the users' data: as many 5000-point series as fit,
    the rest text, an answer of `answer` tokens at the end."""
    import numpy as np
    import torch

    from chatts_train.tokens import IGNORE_INDEX, TS_TOKEN_ID
    from chatts_train.model.processor import Encoded
    from chatts_train.model.timeseries import encoder_rows, normalise

    rng = np.random.default_rng(seed)
    per_series = spec.num_patches(5000)
    n_series = max(0, (seq_len - answer - 64) // per_series)
    rows = [encoder_rows(normalise(rng.normal(size=5000).cumsum())[0], spec) for _ in range(n_series)]
    text = seq_len - answer - n_series * per_series
    ids = torch.from_numpy(rng.integers(0, 151000, size=seq_len))
    ids[text // 2: text // 2 + n_series * per_series] = TS_TOKEN_ID
    labels = torch.full((seq_len,), IGNORE_INDEX)
    labels[-answer:] = ids[-answer:]
    p = spec.patch_size
    return Encoded(ids, torch.cat([r[0] for r in rows]) if rows else torch.zeros(0, p),
                   torch.cat([r[1] for r in rows]) if rows else torch.zeros(0, p, dtype=torch.long), labels)


def usual_recipe(zero: dict, hidden: int) -> dict:
    """The ZeRO-3 block of the usual recipe: LLaMA-Factory's examples/deepspeed/ds_z3_config.json with its
    "auto" values as transformers' Trainer fills them for this hidden size; offload as asked. (build_engine
    then cuts its gradient bucket to the trainable weights' size, as for ours: 33 MiB less than the recipe's
    own on the 14B shape, in the usual recipe's favour.)"""
    return {**{k: v for k, v in zero.items() if k.startswith("offload_")},
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden, "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}


def worker(cfg, a: Probe) -> None:
    """One rank of the probe: `train()`'s own set-up and its own micro-step and token scale, on a synthetic batch of
    the probed length, in four steps: set up, the other lengths, the probed one, the report."""
    import torch

    from chatts_train.fit.hostmem import peak_rss_gib
    from chatts_train.training.engine import init_process

    cfg = recipe_config(cfg, a)
    rank, world, device = init_process(cfg.seed, run_cap(cfg), a.emulate_world)
    config, ds, plan, cards, shape = plan_probe(cfg, a, world, device)
    sampler = DeviceSampler(device)
    if device.type == "cuda":
        sampler.start()
    result = {"rank": rank, "recipe": a.recipe, "micro_steps": 0}
    try:
        engine, hf_ds = set_up(cfg, a, config, ds, plan, cards, shape, world, device, result, sampler)  # noqa: F841
        result["also"] = [measure_length(engine, a, config, plan, cards, shape, world, device, n) for n in also_lengths(a)]
        measure_probed(engine, cfg, a, config, plan, world, device, rank, result)
    except torch.OutOfMemoryError as e:
        result.update(ok=False, oom=True, error=str(e).split("\n")[0][:300], **memory(device))
    sampler.running = False
    if device.type == "cuda":
        sampler.join()
    result["device_peak_gib"] = sampler.peak / GiB
    result["device_peak_by_section_gib"] = {k: v / GiB for k, v in sampler.peaks.items()}
    result["host_peak_gib"] = peak_rss_gib()
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if result.get("oom"):
        os._exit(3)  # the other ranks may be stuck in a collective; the parent ends them


def set_up(cfg, a: Probe, config, ds: dict, plan, cards, shape, world: int, device, result: dict, sampler):
    """The engine as train() makes it (and its hf_ds), and what set-up cost (time, host RAM, GPU memory) in `result`."""
    import torch

    from chatts_train.fit.hostmem import host_need_gib, peak_rss_gib, rss_gib
    from chatts_train.fit.plan import predict_peak_gib, step_seconds
    from chatts_train.model.shards import checkpoint_bytes, largest_shard_bytes
    from chatts_train.training.engine import describe_setup, prepare_engine

    gpu = device.type == "cuda"
    main_len = sum(int(x) for x in a.pack.split(",")) if a.pack else a.seq_len
    result.update(gpu=torch.cuda.get_device_name(device) if gpu else "cpu", plan=plan.as_dict(), plan_line=plan.line(),
                  predicted_peak_gib=round(predict_peak_gib(plan, shape, world, main_len), 3),
                  predicted_step_s=round(step_seconds(plan, shape, cards, main_len), 3), host_gbps=round(cards.host_gbps, 1),
                  total_gib=torch.cuda.get_device_properties(device).total_memory / GiB if gpu else 0,
                  cap_gib=cfg.gpu_memory_cap_gib, offload="param" if plan.offload_param else (cfg.offload or "none"),
                  host_rss_before_load_gib=rss_gib())
    t_build = time.time()
    engine, hf_ds = prepare_engine(cfg, ds, 1000, plan, shape=None if has_checkpoint(cfg) else config)
    engine.module.get_base_model().full_vocabulary_loss = a.recipe == "hf"
    if a.sdpa_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(True)  # an A/B after the load, which switched it off (plan.execute)
    params = list(engine.module.parameters())
    model_bytes = checkpoint_bytes(cfg.model_path) if has_checkpoint(cfg) else sum(
        getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    # the share of the frozen base this rank holds (ZeRO-3: 1 / world, also under an emulated world)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    result.update(base_share_held=held / sum(getattr(p, "ds_numel", p.numel()) for p in params),
                  build_s=time.time() - t_build, setup=describe_setup(engine), host_rss_after_load_gib=rss_gib(),
                  host_peak_after_load_gib=peak_rss_gib(),
                  host_need=host_need_gib(model_bytes, ds, world, largest_shard_bytes(cfg.model_path) if has_checkpoint(cfg) else 0))
    if gpu:
        # set-up's own peak (building, loading), then the steps' peaks alone, as the loop's rows count them
        result.update(setup_peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GiB,
                      reserved_after_setup_gib=torch.cuda.memory_reserved(device) / GiB,
                      outside_allocator_after_setup_gib=outside_allocator_gib(device))
        torch.cuda.reset_peak_memory_stats(device)
        sampler.section = "steps"
    return engine, hf_ds  # keep hf_ds as long as the engine: transformers holds the ZeRO-3 config by weakref


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_length(engine, a: Probe, config, plan, cards, shape, world: int, device, n: int) -> dict:
    """The probe's steps at another length: the steady micro-step, its peak and the plan's prediction."""
    import torch

    from chatts_train.fit.plan import predict_peak_gib, step_seconds
    from chatts_train.model.batching import collate
    from chatts_train.training.loop import micro_step, step_token_scale

    ga = engine.gradient_accumulation_steps()
    b = {k: v.to(device) for k, v in collate([probe_batch(n, config.ts_spec, config.vocab_size)],
                                             config.pad_token_id or 0, multiple=plan.pad_to).items()}
    scale, *_ = step_token_scale([b] * ga, ga, world, device)
    took = []
    for _ in range(a.steps * ga):
        sync(device)
        t = time.perf_counter()
        micro_step(engine, b, scale)
        sync(device)
        took.append(time.perf_counter() - t)
    row = {"seq_len": n, "micro_step_s": steady_median(took, ga),
           "predicted_peak_gib": round(predict_peak_gib(plan, shape, world, n), 3),
           "predicted_step_s": round(step_seconds(plan, shape, cards, n), 3), **memory(device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return row


def measure_probed(engine, cfg, a: Probe, config, plan, world: int, device, rank: int, result: dict) -> None:
    """The probed length (or pack): every micro-step's time, loss, gathered bytes and running peak, one steady
    micro-step profiled where asked, the collectives' bytes, into `result`."""
    import torch

    from chatts_train.model.batching import collate, pack
    from chatts_train.training.engine import loss_scale
    from chatts_train.training.loop import micro_step, step_token_scale

    gpu, ga = device.type == "cuda", engine.gradient_accumulation_steps()
    spec, pad_id = config.ts_spec, config.pad_token_id or 0  # the checkpoint's pad (pads carry no loss)
    if a.pack:
        lengths = [int(x) for x in a.pack.split(",")]
        batch = pack([probe_batch(n, spec, config.vocab_size, seed=i) for i, n in enumerate(lengths)], pad_id,
                     plan.pad_to)
    else:
        batch = collate([probe_batch(a.seq_len, spec, config.vocab_size)], pad_id, multiple=plan.pad_to)
    batch = {k: v.to(device) for k, v in batch.items()}
    # the same sample on every rank and micro-step, scaled as the loop scales an optimizer step of them
    token_scale, *_ = step_token_scale([batch] * ga, ga, world, device)
    # positions without the plan's pads, as the loop counts its tokens (the batch is padded to plan.pad_to)
    result["seq_len"] = sum(int(x) for x in a.pack.split(",")) if a.pack else a.seq_len
    result["samples_per_micro_step"] = len(a.pack.split(",")) if a.pack else 1
    traffic = count_traffic()
    phases = PhasePeaks(engine, device) if a.phases and gpu else None
    times, losses, warm_traffic, gathered, step_peaks = [], [], {}, [], []
    n_steps = a.steps * ga
    # a steady micro-step that is not an optimizer step's last one (7 of 8 in the job are like it); rank 0
    # profiles it, the others wait for rank 0 in it: every rank leaves it out of the steady median
    profiled = n_steps - 2 if a.profile and gpu and n_steps >= 2 else None
    prof = None
    for i in range(n_steps):
        if i == ga:
            warm_traffic = dict(traffic)
        if i == profiled and rank == 0:
            prof = start_profile()
        sync(device)
        t = time.perf_counter()
        loss = float(micro_step(engine, batch, token_scale))
        sync(device)
        times.append(time.perf_counter() - t)
        if i == profiled and prof is not None:
            prof.stop()  # its tables are made after the loop: that takes seconds the other ranks would wait
        losses.append(loss)
        gathered.append(traffic["all_gather"] - sum(gathered))
        if gpu and not phases:  # the running peak: which micro-step reaches it (--phases resets it)
            step_peaks.append(round(torch.cuda.max_memory_allocated(device) / GiB, 3))
        result["micro_steps"] = i + 1
        if i + 1 == ga:
            result["first_step_done_s"] = time.time() - a.t0
    if profiled is not None:
        result["profiled_micro_step_s"] = times[profiled]
    if prof is not None:
        result["budget"] = kernel_budget(prof, times[profiled])
        flags = "_hostckpt" * plan.checkpoints_on_cpu + "_layers" * plan.whole_layers
        write_kernel_table(prof, a.profile, f"{a.recipe}_{cfg.offload or 'config'}_{result['seq_len']}{flags}")
    counted_steps = n_steps - ga if warm_traffic else n_steps
    result["link_bytes_per_micro_step"] = {k: (v - warm_traffic.get(k, 0.0)) / max(counted_steps, 1)
                                           for k, v in traffic.items()}
    result.update(all_gather_bytes_per_micro_step=gathered, peak_allocated_so_far_gib=step_peaks)
    result.update(ok=True, micro_step_s=steady_median(times, ga, profiled), micro_step_times=times, losses=losses,
                  optimizer_steps=engine.global_steps, skipped_steps=engine.skipped_steps, loss_scale=loss_scale(engine))
    result.update(memory(device))
    if gpu:
        result["outside_allocator_gib"] = outside_allocator_gib(device)
    if phases:
        result["phase_peaks_gib"] = phases.peaks
        result["peak_allocated_gib"] = max(v for k, v in phases.peaks.items() if not k.endswith(("_start", "_reserved")))


def recipe_config(cfg, a: Probe):
    """The training options a recipe runs with: ours as given (packing where --pack), the usual recipe with none of
    this project's (the reference plan: ZeRO-3, per-Linear gathers, every layer recomputed; plain activations)."""
    cfg = replace(cfg, packing=bool(a.pack), grad_accum=cfg.grad_accum or 4, micro_batch=1)
    if a.recipe != "hf":
        return cfg
    return replace(cfg, plan="reference", zero_stage=None, recompute_layers=None, gradient_checkpointing=None,
                   checkpoints_on_cpu=None, gather_whole_layers=None, lean_activations=False, compile_layers=False)


def run_cap(cfg) -> Optional[float]:
    from chatts_train.fit.plan import run_cap_gib

    return run_cap_gib(cfg.card, cfg.gpu_memory_cap_gib)


def also_lengths(a: Probe) -> list[int]:
    return [int(x) for x in a.also_seq_len.split(",") if x]


def plan_probe(cfg, a: Probe, world: int, device):
    """As training sets up (run.setup): the model's config, the DeepSpeed config, and the job's own plan for the
    longest probed length and the job's micro-steps per rank, carried out in the DeepSpeed config."""
    from chatts_train.fit.dsconfig import precision, run_ds_config, run_precision
    from chatts_train.fit.plan import Shape, apply_to_ds, plan_run
    from chatts_train.model.modeling import check_checkpoint

    config = check_checkpoint(cfg.model_path) if has_checkpoint(cfg) else shape_config(a)
    gpu = device.type == "cuda"  # the CPU accelerator has no fp16: the tests' runs are fp32
    ds = run_ds_config(cfg if gpu else replace(cfg, fp16=False, bf16=None), world, config.hidden_size,
                       run_precision(cfg.fp16, cfg.bf16, cfg.card) if gpu else None)
    if a.recipe == "hf":
        ds["zero_optimization"] = usual_recipe(ds["zero_optimization"], config.hidden_size)
    for kv in a.zero if a.recipe != "hf" else ():  # --zero's knobs are ours, never the usual recipe's
        key, value = kv.split("=", 1)
        ds["zero_optimization"][key] = json.loads(value)
    positions = max([sum(int(x) for x in a.pack.split(",")) if a.pack else a.seq_len] + also_lengths(a))
    plan, _, cards = plan_run(cfg, ds, config, positions, world, device, math.ceil(a.samples * cfg.num_epochs / world))
    apply_to_ds(plan, ds)
    return config, ds, plan, cards, Shape.of(config, precision(ds).itemsize)


def shape_config(a: Probe):
    """The model shape without weights: a config.json (`--shape_config`) or the published 14B config (`--release`)."""
    from chatts_train.model.modeling import ChatTSConfig, read_chatts_config
    from chatts_train.model.published import chatts_config

    raw = (read_chatts_config(os.path.dirname(os.path.abspath(a.shape_config))) if a.shape_config
           else chatts_config(a.release))
    raw.pop("model_type", None)
    return ChatTSConfig(**raw)


# ---------------------------------------------------------------------------------------------- parent

def size_from_data(cfg, a: Probe) -> None:
    """Where --data resolves (as training resolves it), probe its longest kept sample and count its samples."""
    from chatts_train.data.indexing import index_data, resolve_sources
    from chatts_train.errors import ChatTSTrainError
    from chatts_train.model.processor import ChatTSProcessor

    try:
        sources = resolve_sources(cfg.data, cfg.dataset_dir)
    except ChatTSTrainError:
        return
    index = index_data(sources, ChatTSProcessor.from_pretrained(cfg.model_path), cfg.cutoff_len)
    a.seq_len, a.samples = int(index.length.max()), len(index)


def run_probe(cfg, a: Probe, argv: list[str], recipe: str = "ours") -> dict:
    """The probe's workers (one per GPU, or rank 0 alone of an emulated world), each running `worker` with the
    parent's options and its resolved length; their reports summarised."""
    t0 = time.time()
    size_from_data(cfg, a)
    out = tempfile.mkdtemp(prefix="memprobe-")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29611"),
           "WORLD_SIZE": str(a.num_gpus), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if recipe == "hf":  # the usual recipe runs with PyTorch's default allocator
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:False"
    # later options win: the workers get this run's resolved length and offload
    argv = [*argv, "--seq_len", str(a.seq_len), "--recipe", recipe, "--json", "false", "--out", out, "--t0", str(t0)]
    if cfg.offload:
        argv += ["--offload", cfg.offload]
    workers = 1 if a.emulate_world else a.num_gpus  # an emulated world: rank 0 alone
    procs, logs = [], [open(os.path.join(out, f"rank{r}.log"), "w+") for r in range(workers)]
    for r in range(workers):  # each worker's output to its log (shown after it ends): a crash reports its error
        procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(r)],
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=logs[r], stderr=subprocess.STDOUT))
    oom_seen = None
    while any(p.poll() is None for p in procs):
        if oom_seen is None and any(p.returncode == 3 for p in procs):
            oom_seen = time.time()
        if oom_seen and time.time() - oom_seen > 20:
            for p in procs:
                p.kill()
        time.sleep(0.5)
    ranks = []
    for r, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        sys.stderr.write(text)
        path = os.path.join(out, f"rank{r}.json")
        ranks.append(json.load(open(path)) if os.path.exists(path) else
                     {"rank": r, "ok": False, "crashed": proc.returncode != -9, "exit_code": proc.returncode,
                      "error": last_error(text) if proc.returncode != -9 else "ended after another rank's out of memory"})
    return summarise_probe(cfg, a, ranks, time.time() - t0, recipe)


def last_error(text: str) -> str:
    """The last line of a worker's output that names an error (a traceback's last line), or its last line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    named = [x for x in lines if "Error" in x or "error" in x or "Exception" in x]
    return (named or lines or ["no output"])[-1][:400]


def summarise_probe(cfg, a: Probe, ranks: list[dict], wall_s: float, recipe: str = "ours") -> dict:
    from chatts_train.fit.cards import CARDS
    from chatts_train.fit.plan import Shape, step_flops
    from chatts_train.model.modeling import config_of

    ok = all(r.get("ok") for r in ranks)
    shape = Shape.of(config_of(cfg.model_path) if has_checkpoint(cfg) else shape_config(a))
    alloc = "expandable_segments:False" if recipe == "hf" else os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True (train()'s default)")
    rep = {"ok": ok, "recipe": recipe, "offload": ranks[0].get("offload"), "zero_overrides": a.zero, "gpus": a.num_gpus,
           "plan": ranks[0].get("plan"), "plan_line": ranks[0].get("plan_line"),
           "predicted_peak_gib": ranks[0].get("predicted_peak_gib"), "predicted_step_s": ranks[0].get("predicted_step_s"),
           "alloc_conf": alloc, "wall_s": round(wall_s, 1), "emulated_world": a.emulate_world,
           "ranks": ranks, "budget_gib": a.budget_gib}
    if ok:
        seq = ranks[0]["seq_len"]
        step = max(r["micro_step_s"] for r in ranks)
        # MFU against the card that ran the step (an emulated card's work runs on this one)
        ran_on = next((c for c in CARDS.values() if any(m in ranks[0]["gpu"] for m in c.matches)), None)
        plan = ranks[0].get("plan") or {}
        model_flops = sum(step_flops(shape, seq, 0.0))
        hw_flops = sum(step_flops(shape, seq, plan.get("recompute_layers", shape.layers) / shape.layers))
        rep.update(seq_len=seq, micro_step_s=round(step, 3), tokens_per_s_per_gpu=round(seq / step, 1),
                   time_to_first_step_s=round(max(r["first_step_done_s"] for r in ranks), 1),
                   device_peak_gib=round(max(r["device_peak_gib"] for r in ranks), 2),
                   peak_allocated_gib=round(max(r["peak_allocated_gib"] for r in ranks), 2),
                   peak_reserved_gib=round(max(r["peak_reserved_gib"] for r in ranks), 2),
                   alloc_retries=max(r["alloc_retries"] for r in ranks),
                   host_peak_gib=round(max(r["host_peak_gib"] for r in ranks), 1),
                   host_rss_after_load_gib=round(max(r.get("host_rss_after_load_gib", 0) for r in ranks), 1),
                   host_need=ranks[0].get("host_need"), setup=ranks[0].get("setup"), losses=ranks[0].get("losses"),
                   attention=(ranks[0].get("setup") or {}).get("attention"),
                   sdpa_kernel=(ranks[0].get("setup") or {}).get("sdpa_kernel"),
                   link_bytes_per_micro_step={k: round(max(r["link_bytes_per_micro_step"][k] for r in ranks))
                                              for k in ranks[0].get("link_bytes_per_micro_step", {})},
                   budget=ranks[0].get("budget"), host_gbps=ranks[0].get("host_gbps"),
                   also=[{**x, "prediction_error": round(x["predicted_peak_gib"] / x["peak_allocated_gib"] - 1, 4)
                          if x.get("peak_allocated_gib") else None} for x in ranks[0].get("also", [])],
                   phase_peaks_gib=per_key_max(ranks, "phase_peaks_gib"),
                   device_peak_by_section_gib=per_key_max(ranks, "device_peak_by_section_gib"),
                   **{k: round(max(r.get(k, 0.0) for r in ranks), 2) for k in (
                       "setup_peak_allocated_gib", "reserved_after_setup_gib", "outside_allocator_after_setup_gib",
                       "outside_allocator_gib",
                       "inactive_split_peak_gib")},
                   # an upper bound: every sample costs a micro-step at the probed (worst-case) length
                   estimated_job_s=round(a.samples * cfg.num_epochs / a.num_gpus * step))
        if rep["predicted_peak_gib"] and rep["peak_allocated_gib"]:  # did the plan's memory model hold? (GPU only)
            rep["prediction_error"] = round(rep["predicted_peak_gib"] / rep["peak_allocated_gib"] - 1, 4)
        rep["card"] = plan.get("card") or (ran_on.name if ran_on else None)
        if ran_on:
            rep["mfu"] = round(model_flops / step / (ran_on.fp16_tflops * 1e12), 3)
            rep["hfu"] = round(hw_flops / step / (ran_on.fp16_tflops * 1e12), 3)
    rep["verdict"] = verdict(a, rep)
    return rep


def per_key_max(ranks: list[dict], key: str) -> dict:
    """The ranks' maximum of each entry of a {name: GiB} result (the worst rank is the one that OOMs)."""
    names = {k for r in ranks for k in r.get(key, {})}
    return {k: round(max(r.get(key, {}).get(k, 0.0) for r in ranks), 2) for k in sorted(names)}


# what took ChatTS-14B at 4,096 tokens from 20.8 to 17.9 GiB device-level under a 22 GiB cap (HISTORY.md section 8)
KNOBS = ("the layer checkpoints in host memory (--checkpoints_on_cpu true; -1.8 GiB allocated at 4,096 tokens "
         "on 14B), PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,garbage_collection_threshold:0.7 with a "
         "per-process cap (--gpu_memory_cap_gib; -1.2 GiB reserved), NCCL_MAX_NCHANNELS=4 on NVLink machines (-0.8 GiB outside PyTorch); "
         "all three: 17.9 GiB device-level on 14B at 4,096 tokens; or a shorter --cutoff_len")


def verdict(a, rep: dict) -> str:
    where = f" under the plan '{rep['plan_line']}'" if rep.get("plan_line") else ""
    if not rep["ok"]:
        crashed = [r for r in rep["ranks"] if r.get("crashed")]
        if crashed and not any(r.get("oom") for r in rep["ranks"]):
            r = crashed[0]
            return (f"the probe failed, so it says nothing of memory: rank {r['rank']} exited with code "
                    f"{r.get('exit_code')}: {r.get('error')}")
        done = min(r.get("micro_steps", 0) for r in rep["ranks"])
        return (f"does NOT fit{where}: out of memory after {done} micro-steps. Keep parameter offload, or try "
                f"{KNOBS}.")
    held = (f"; the plan predicted {rep['predicted_peak_gib']:.2f} GiB allocated, measured "
            f"{rep['peak_allocated_gib']:.2f} ({rep['prediction_error']:+.1%})" if "prediction_error" in rep else "")
    peak = rep["device_peak_gib"]
    if rep["offload"] == "none" and peak <= a.budget_gib:
        return (f"offload can go{where}: device-level peak {peak:.1f} GiB per GPU <= budget {a.budget_gib:g} GiB "
                f"({rep['alloc_retries']} allocator retries){held}")
    if rep["offload"] == "none":
        return (f"keep offload: device-level peak {peak:.1f} GiB per GPU > budget {a.budget_gib:g} GiB{where}{held}. "
                f"Next knobs: {KNOBS}.")
    return f"with offload {rep['offload']}{where}: device-level peak {peak:.1f} GiB per GPU (budget {a.budget_gib:g} GiB){held}"


def write_config(cfg, a: Probe, rep: dict) -> str | None:
    """Write the DeepSpeed config the verdict calls for: the measured plan's ZeRO stage without offload when it
    fits, else ZeRO-3 with parameter offload."""
    if not a.write_config:
        return None
    with open(cfg.ds_config) as f:
        ds = json.load(f)
    zero = ds.setdefault("zero_optimization", {})
    fits = rep["ok"] and rep["offload"] == "none" and rep["device_peak_gib"] <= a.budget_gib
    zero.pop("offload_optimizer", None)
    if fits:
        zero.pop("offload_param", None)
        zero["stage"] = (rep.get("plan") or {}).get("zero_stage", zero.get("stage", 3))
    else:
        zero.update(stage=3, offload_param={"device": "cpu", "pin_memory": True})
    ds["_memprobe"] = {"verdict": rep["verdict"], "seq_len": rep.get("seq_len"), "device_peak_gib": rep.get("device_peak_gib"),
                       "gpu": rep["ranks"][0].get("gpu"), "cap_gib": cfg.gpu_memory_cap_gib, "date": time.strftime("%Y-%m-%d")}
    with open(a.write_config, "w") as f:
        json.dump(ds, f, indent=2)
    return a.write_config


def main(argv=None) -> None:
    sys.path.insert(0, ROOT)
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, a = parse(argv)
    if a.worker is not None:
        return worker(cfg, a)
    report_to, sys.stdout = sys.stdout, sys.stderr  # library logs (DeepSpeed prints to stdout) stay off the report
    baseline = run_probe(cfg, a, argv, "hf") if a.baseline else None
    rep = run_probe(cfg, a, argv)
    rep["config_written"] = write_config(cfg, a, rep)
    if baseline:
        rep["baseline"] = {k: baseline.get(k) for k in ("recipe", "ok", "micro_step_s", "tokens_per_s_per_gpu", "mfu",
                                                       "device_peak_gib", "peak_allocated_gib", "peak_reserved_gib",
                                                       "alloc_retries", "link_bytes_per_micro_step", "budget", "losses",
                                                       "time_to_first_step_s", "verdict")}
        if rep["ok"] and baseline["ok"]:
            rep["baseline"]["speedup"] = round(baseline["micro_step_s"] / rep["micro_step_s"], 3)
            rep["baseline"]["allocated_saved_gib"] = round(baseline["peak_allocated_gib"] - rep["peak_allocated_gib"], 2)
    if a.compare_offload:
        other = run_probe(replace(cfg, offload=a.compare_offload), a, argv)
        rep["compare"] = {k: other.get(k) for k in ("offload", "ok", "micro_step_s", "device_peak_gib",
                                                    "peak_allocated_gib", "peak_reserved_gib", "time_to_first_step_s",
                                                    "link_bytes_per_micro_step", "budget", "verdict")}
        if rep["ok"] and other["ok"]:
            rep["compare"]["step_time_ratio"] = round(other["micro_step_s"] / rep["micro_step_s"], 3)
    sys.stdout = report_to
    if a.json:
        print(json.dumps(rep, indent=2))
        return
    keys = ["plan_line", "attention", "sdpa_kernel", "predicted_peak_gib", "prediction_error", "also", "seq_len", "micro_step_s", "tokens_per_s_per_gpu", "mfu", "hfu", "time_to_first_step_s", "device_peak_gib",
            "peak_allocated_gib", "peak_reserved_gib", "alloc_retries", "host_rss_after_load_gib", "host_peak_gib",
            "estimated_job_s", "link_bytes_per_micro_step"]
    where = (f"rank 0 of {a.emulate_world} emulated on one GPU (fake collectives: no link time in these numbers)"
             if a.emulate_world else f"{a.num_gpus} GPU(s)")
    print(f"\nmemprobe: {where}, card {rep.get('card') or cfg.card}, offload {rep['offload']}, cap {cfg.gpu_memory_cap_gib} GiB")
    for k in keys:
        if k in rep:
            print(f"  {k:>22}: {rep[k]}")
    for r in rep["ranks"]:
        print(f"  rank {r['rank']}: " + ", ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}" for k, v in r.items()
                                            if k in ("gpu", "ok", "device_peak_gib", "peak_reserved_gib", "micro_steps", "error")))
    if rep.get("host_need"):
        h = rep["host_need"]
        print(f"host RAM: ~{h['node_gib']} GiB per node ({h['ranks_on_node']} ranks x {h['per_rank_gib']} GiB, of which "
              f"{h['pinned_partition_gib']} GiB pinned weights)")
    print(f"verdict: {rep['verdict']}")
    if "compare" in rep:
        print(f"compare: {rep['compare']}")
    if "baseline" in rep:
        b = rep["baseline"]
        print(f"usual recipe: {b['micro_step_s']} s/micro-step, {b['peak_allocated_gib']} GiB allocated, device peak "
              f"{b['device_peak_gib']} GiB; ours {b.get('speedup', '-')}x its speed, {b.get('allocated_saved_gib', '-')} GiB less")
    if rep.get("budget"):
        print(f"micro-step budget (rank 0): {rep['budget']}")
    if rep["config_written"]:
        print(f"wrote {rep['config_written']}")


if __name__ == "__main__":
    main()
