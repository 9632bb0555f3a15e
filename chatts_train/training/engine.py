"""The DeepSpeed engine a run trains with, made one way for the loop, memprobe and custom loops: process
set-up, engine with a checked fp16 loss scaler, training mode, and a description of what a step runs with."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ..fit.compiled_layers import compile_layers, is_compiled
from .config import TrainConfig
from ..fit.cpu_comm import fix_cpu_accelerator
from ..fit.dsconfig import precision
from ..errors import TrainingError
from ..fit.lean_activations import EAGER, compile_ahead, fused_kernels, keep_fewer_activations, lean_modules
from ..fit.loading import build_model
from .lora import add_lora
from ..model.modeling import ChatTSConfig, check_checkpoint
from .optim import make_optimizer, warmup_cosine
from ..fit.plan import Plan, apply_env, execute


def init_process(seed: int, gpu_memory_cap_gib: Optional[float] = None,
                 emulate_world: Optional[int] = None) -> tuple[int, int, torch.device]:
    """Process group, this rank's device, seeds; returns (rank, world, device). Shared by train() and memprobe.
    The plan's allocator and NCCL settings go into the environment first (both are read later, at the first
    allocation and the first collective), and on the CPU accelerator DeepSpeed's faults there are corrected
    before the process group starts (cpu_comm.py). `emulate_world` N: this process is rank 0 of N whose
    collectives are no-ops of the right shapes (torch's fake process group), so its partitions, gathered buffers
    and kernels are those of one rank of N, and no time is spent on links."""
    if emulate_world:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(emulate_world))
    apply_env(gpu_memory_cap_gib, int(os.environ.get("WORLD_SIZE", "1")))
    quiet_known_warnings()
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        # Started without a launcher (`python -m chatts_train`): one process, rather than DeepSpeed's MPI
        # discovery ("No module named mpi4py").
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    fix_cpu_accelerator()
    if emulate_world:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=emulate_world)
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if gpu_memory_cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_cap_gib * 1024 ** 3 / total), device)
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    return rank, world, device


# Warnings that are not the user's to act on: torch's about the collectives DeepSpeed calls (every rank, every
# run), PEFT's at each adapter save about a tokenizer it looks for beside the base model.
KNOWN_WARNINGS = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                  r"Could not find a config file in .* will assume that the vocabulary was not modified")


def quiet_known_warnings() -> None:
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def allocator_note(gpu_memory_cap_gib: Optional[float]) -> Optional[str]:
    """A PYTORCH_CUDA_ALLOC_CONF setting that cannot act in this run, or None. PyTorch's allocator collects
    its cache (garbage_collection_threshold) only under a per-process memory fraction."""
    if "garbage_collection_threshold" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") and not gpu_memory_cap_gib:
        return ("PYTORCH_CUDA_ALLOC_CONF's garbage_collection_threshold acts only under a per-process cap: add "
                "--gpu_memory_cap_gib (the card's size in GiB will do)")
    return None


def build_engine(model, ds: dict, cfg: TrainConfig, total_steps: int):
    """`deepspeed.initialize` with AdamW (CPU Adam when the optimizer is offloaded) and warmup + cosine."""
    dtype = precision(ds)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            # PEFT leaves LoRA weights in fp32 under zero.Init; in fp16 the ZeRO-3 optimizer would then build
            # a static loss scaler of 1.0 and no scaling happens. fp16 weights give fp32 masters + a dynamic scaler.
            p.data = p.data.to(dtype)
    zero = ds["zero_optimization"]
    optimizer = make_optimizer(model, cfg, cpu_adam=bool(zero.get("offload_optimizer")))
    schedule = warmup_cosine(int(cfg.warmup_ratio * total_steps), total_steps, cfg.min_lr_ratio)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if zero.get("stage") == 2:
        accumulate_zero2_gradients(engine.optimizer)
    check_loss_scaling(engine)
    return engine


def accumulate_zero2_gradients(optimizer) -> None:
    """DeepSpeed 0.17.6 to 0.18.2 keep only the last micro-step's gradients of a ZeRO-2 accumulation
    (deepspeedai/DeepSpeed#7718, fixed in 0.18.3): the gradient epilogue takes a micro-step for the first one
    when `averaged_gradients` is empty, which it is until the accumulation boundary, so every micro-step
    overwrote the last. (Found here: ZeRO-2 made 1/accumulation of the reference plan's LoRA update.) The
    epilogue is made to tell the first micro-step as 0.18.3 does, by the accumulated gradients themselves."""
    from packaging.version import Version

    if not Version("0.17.6") <= Version(deepspeed.__version__.split("+")[0]) < Version("0.18.3"):
        return
    epilogue = optimizer.independent_gradient_partition_epilogue
    placeholder = object()

    def epilogue_that_accumulates():
        groups = range(len(optimizer.bit16_groups))
        for i in groups:  # "accumulate" exactly where earlier micro-steps' gradients exist
            accumulating = optimizer.all_grad_tensors.get(i) is not None
            optimizer.averaged_gradients[i] = placeholder if accumulating else None
        epilogue()
        for i in groups:  # the boundary set the real averages; elsewhere leave it as it was
            if optimizer.averaged_gradients.get(i) is placeholder:
                optimizer.averaged_gradients[i] = None

    optimizer.independent_gradient_partition_epilogue = epilogue_that_accumulates


def prepare_engine(cfg: TrainConfig, ds: dict, total_steps: int, plan: Plan, shape: Optional[ChatTSConfig] = None):
    """The one way a training engine is made: `train()`, `benchmarks/memprobe.py` and custom loops all call
    it, so what is measured is what runs. `ds` already carries out `plan` (plan.apply_to_ds); the plan says
    how many layers are recomputed, where their checkpoints wait, how ZeRO-3 gathers, whether the layers are
    compiled (compiled_layers.py), which attention runs and which SDPA kernels may (plan.execute). Where the plan
    says so, the fused norm and gate kernels compiled first; model loaded from `cfg.model_path` (or, with `shape`, built from
    config alone), LoRA with reentrant checkpointing, trainable weights in the run's dtype, DeepSpeed engine
    with a checked loss scaler, and training mode: `from_pretrained` returns eval mode, and in eval mode
    transformers silently skips gradient checkpointing (measured on 14B: 40 GiB instead of 7 GiB per GPU).

    Returns (engine, hf_ds); keep hf_ds alive as long as the engine."""
    fix_cpu_accelerator()  # done already where init_process made the process group; a custom loop may not have
    device = torch.device(get_accelerator().current_device_name())
    execute(plan)
    kernels = fused_kernels() if plan.fused_kernels else EAGER
    if cfg.lean_activations and kernels is not EAGER:
        config = shape if shape is not None else check_checkpoint(cfg.model_path)
        try:
            compile_ahead(kernels, config.hidden_size, config.intermediate_size, config.rms_norm_eps,
                          cfg.cutoff_len, precision(ds), device)
        except Exception as e:  # Inductor / Triton on this machine (a compiler, a driver, an old GPU)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrainingError(f"compiling the fused norm and gate kernels failed ({type(e).__name__}: {first}); "
                                "run with --fused_kernels false: the same arithmetic, op by op") from e
        get_accelerator().empty_cache()  # nothing else is on the GPU yet: give the trial runs' memory back
    model, hf_ds = build_model(None if shape is not None else cfg.model_path, ds, plan.attention,
                               config=shape, device=device)
    if cfg.lean_activations:
        keep_fewer_activations(model, kernels)
    # LoRA's initial weights from the seed alone, the same on every rank and under every plan (how the base
    # was built draws from the generator differently per ZeRO stage)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        # compiled layers: the first layer's input requires grad too (its q/k/v input GEMMs once a micro-step more)
        model = add_lora(model, cfg, plan.recompute_layers, plan.checkpoints_on_cpu,
                         inputs_require_grad=plan.compile_layers)
    if plan.zero_stage == 3 and plan.whole_layers:
        gather_whole_layers(model)
    if plan.compile_layers:
        compile_layers(decoder_layers(model))
    engine = build_engine(model, ds, cfg, total_steps)
    engine.train()
    return engine, hf_ds


def gather_whole_layers(model: torch.nn.Module) -> None:
    """One all-gather and one hook pair per decoder layer instead of per Linear: the hooks' CPU time is where
    a ZeRO-3 micro-step's GPU sits idle (benchmarks/HISTORY.md, the micro-step budget). A gathered layer is
    kept from its recompute to its backward and two may be live (the plan's sizes, plan.apply_to_ds: measured on
    14B at 4,096 tokens 0.91 s per micro-step vs 0.95 s with one live, 1.1-1.5 s per Linear; +0.7 GiB allocated)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [type(decoder_layers(model)[0])])


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Qwen2DecoderLayer"]


def in_training_mode(model: torch.nn.Module) -> bool:
    return model.training and all(m.training for m in decoder_layers(model))


def check_training_mode(model: torch.nn.Module) -> None:
    """Refuse a training step in eval mode: transformers then skips gradient checkpointing without a word,
    and the step needs ~5x the activation memory (an OOM on a 22 GB card)."""
    if not in_training_mode(model):
        raise TrainingError("a training step was asked for with the model in eval mode, where transformers skips "
                            "gradient checkpointing (~5x the memory): call engine.train() after loading or "
                            "evaluating, before the next micro-step")


def describe_setup(engine) -> dict:
    """What the training step will run with, for comparing set-ups (train() vs memprobe) and the run record."""
    model = engine.module
    layers = decoder_layers(model)
    trainable = {n: str(p.dtype) for n, p in model.named_parameters() if p.requires_grad}
    frozen = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    return {
        "training": in_training_mode(model),
        "decoder_layers": len(layers),
        "checkpointed_layers": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in layers),
        "checkpointing_reentrant": _reentrant(model),
        "input_requires_grad_hook": getattr(model.get_base_model(), "_require_grads_hook", None) is not None,
        "attention": model.config._attn_implementation,
        "sdpa_kernel": training_sdpa_kernel(model),
        "checkpoints_on_cpu": bool(getattr(model.get_base_model(), "checkpoints_on_cpu", False)),
        "whole_layer_gathers": any(getattr(m, "_z3_leaf", False) for m in layers),
        "compiled_layers": sum(map(is_compiled, layers)),
        "lean_activation_modules": lean_modules(model),
        "fused_kernel_modules": lean_modules(model) - lean_modules(model, EAGER),
        # DeepSpeed's memory_efficient_linear replaces F.linear process-wide, keeping frozen Linears' inputs
        "linear_keeps_frozen_inputs": torch.nn.functional.linear.__name__ == "zero3_linear_wrap",
        "frozen_dtypes": frozen,
        "trainable": trainable,
        "trainable_numel": int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)),
        "gradient_bucket_numel": int(getattr(engine.optimizer, "reduce_bucket_size", 0)),
        # ZeRO's Python hooks on trainable gradients: each runs every micro-step (none at stage 1, plan.choose)
        "gradient_hooks": len(getattr(engine.optimizer, "_grad_acc_hooks", ())),
        "zero_stage": engine.zero_optimization_stage(),
        "offload_param": bool(engine.zero_offload_param()) if engine.zero_optimization_stage() == 3 else False,
        "loss_scaler": type(getattr(engine.optimizer, "loss_scaler", None)).__name__,
    }


def training_sdpa_kernel(model) -> Optional[str]:
    """The SDPA kernel that serves this model's training attention on this process's device, as PyTorch's
    dispatcher picks it now (None where SDPA is not used)."""
    from ..model.attention import sdpa_backend

    c = model.config
    device = torch.device(get_accelerator().current_device_name())
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return sdpa_backend(c._attn_implementation, device, dtype, c.num_attention_heads, c.num_key_value_heads,
                        c.hidden_size // c.num_attention_heads)


def _reentrant(model) -> Optional[bool]:
    fn = next((m._gradient_checkpointing_func for m in decoder_layers(model)
               if hasattr(m, "_gradient_checkpointing_func")), None)
    fn = getattr(fn, "keywords", {}).get("checkpoint", fn)  # unwrapped from lora._checkpoint_to_host
    return None if fn is None else bool(getattr(fn, "keywords", {}).get("use_reentrant"))


def check_loss_scaling(engine) -> None:
    """Refuse to train fp16 without a dynamic loss scaler: it would silently underflow gradients."""
    if not engine.fp16_enabled():
        return
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if type(scaler).__name__ != "DynamicLossScaler":
        raise TrainingError(
            f"fp16 is on but the loss scaler is {type(scaler).__name__} (scale {loss_scale(engine)}), not dynamic. "
            "Set fp16.loss_scale to 0 in the DeepSpeed config, and keep trainable weights in fp16.")


def loss_scale(engine) -> float:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(getattr(scaler, "cur_scale", getattr(scaler, "loss_scale", 1.0))) if scaler else 1.0
