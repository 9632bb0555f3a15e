"""Run configuration as a plain dataclass that doubles as the command line (`--field value`), checked as a
whole before anything starts."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    # model and data (ChatTS-Training / LLaMA-Factory options are taken too, or --from_llamafactory FILE.yaml)
    model_path: str = "checkpoints/ChatTS-14B"  # a ChatTS checkpoint folder (either release)
    data: str = "gdsh,hbsn,whlj,zhlh"  # JSONL paths or dataset names, each optionally name:weight
    dataset_dir: str = "data"  # where dataset_info.json lives, for dataset names
    output_dir: str = "runs/chatts-lora"
    cutoff_len: int = 4096  # expanded length: text tokens + one position per time-series patch
    val_size: float = 0.0  # fraction (< 1) or count of samples held out for evaluation
    strict_data: bool = False  # stop on any bad sample instead of skipping it with a report
    # LoRA
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj"
    lora_encoder: bool = False  # also put LoRA on the time-series encoder's Linear layers
    train_encoder: bool = False  # train the whole encoder (saved with the adapter as modules_to_save)
    encoder_lr: Optional[float] = None  # defaults to learning_rate
    # optimisation (micro-batch, accumulation, clipping, fp16 and offload live in the DeepSpeed config)
    ds_config: str = "ds_config.json"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    num_epochs: float = 3.0
    max_steps: int = 0  # optimizer steps; > 0 overrides num_epochs
    micro_batch: Optional[int] = None  # overrides train_micro_batch_size_per_gpu
    packing: bool = False  # join consecutive samples into one row up to cutoff_len (attention stays per sample)
    grad_accum: Optional[int] = None  # overrides gradient_accumulation_steps
    fp16: Optional[bool] = None  # overrides fp16.enabled (the CPU demo runs fp32)
    bf16: Optional[bool] = None  # overrides bf16.enabled (cards from Ampere on)
    # how the run executes (plan.py): what is left unset here and in the DeepSpeed file, the plan decides
    plan: str = "auto"  # auto: the fastest plan predicted to fit the cards; reference: ZeRO-3, per-Linear, all recomputed
    zero_stage: Optional[int] = None  # 1 or 2: frozen base whole on every GPU; 3: partitioned (overrides the DeepSpeed file)
    offload: Optional[str] = None  # none | param | optimizer | all; overrides the DeepSpeed config
    recompute_layers: Optional[int] = None  # decoder layers recomputed in backward (0..all); the rest keep activations
    gradient_checkpointing: Optional[bool] = None  # false: recompute none; true: recompute all
    checkpoints_on_cpu: Optional[bool] = None  # the recomputed layers' inputs wait in host memory (~1.9 GiB/GPU on 14B at 4096)
    gather_whole_layers: Optional[bool] = None  # ZeRO-3 gathers a decoder layer's weights at once, not per Linear
    compile_layers: Optional[bool] = None  # base whole (ZeRO-1/2): decoder layers through torch.compile (default on CUDA with Triton)
    lean_activations: bool = True  # MLP gate and RMSNorms keep less for backward, bit-identical (~0.2 GiB per 14B layer at 4096)
    fused_kernels: bool = True  # on CUDA with Triton: those norms and the gate compiled to one kernel each (torch.compile)
    card: str = "auto"  # the GPU to plan for (2080ti, 3090, 4090, a100-40, a100-80, h100, h200); on a bigger one, run as it
    gpu_memory_cap_gib: Optional[float] = None  # cap each process's PyTorch memory (emulate a smaller card)
    attn_implementation: Optional[str] = None  # sdpa (default), flash_attention_2 (sm80+), eager
    seed: int = 42
    # saving and logging
    save_steps: int = 50  # adapter + resume checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2  # resume checkpoints kept on disk
    resume: bool = False  # continue from the latest resume checkpoint in output_dir
    overwrite_output_dir: bool = False  # start over in an output_dir that holds a run (its checkpoints go)
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss before the run stops
    plot: bool = True  # PNG of the curves at the end (needs matplotlib)
    tensorboard: bool = True  # when tensorboard is installed
    eval_at_end: bool = False  # generate on the held-out split and score it (needs val_size)
    eval_at_start: bool = False  # score the held-out split before training too, for a before/after table
    eval_max_new_tokens: int = 128

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = (None, "auto", "sdpa", "eager", "flash_attention_2")
PLAN_MODES = ("auto", "reference")


def check_config(cfg: TrainConfig) -> None:
    """Every problem of the configuration at once, before any process group or model load starts (the
    DeepSpeed file and its overrides included): raises ConfigError."""
    import torch

    from ..fit.dsconfig import run_ds_config
    from ..errors import ChatTSTrainError, ConfigError
    from ..model.modeling import config_of

    problems = []
    try:
        hidden = config_of(cfg.model_path).hidden_size
    except ChatTSTrainError:
        hidden = 1  # the folder's problem is reported below
    try:  # "auto" precision is decided once the process has its device; here only whether each "auto" resolves
        ds = run_ds_config(cfg, 1, hidden, torch.float16)
        if cfg.packing and ds["train_micro_batch_size_per_gpu"] != 1:
            problems.append(f"--packing joins samples into one row per micro-step: set the micro-batch to 1 "
                            f"(got {ds['train_micro_batch_size_per_gpu']})")
    except ChatTSTrainError as e:
        problems.append(str(e))
    if not os.path.isfile(os.path.join(cfg.model_path, "config.json")):
        problems.append(f"--model_path {cfg.model_path}: no config.json there; point it at a ChatTS checkpoint folder")
    else:
        from ..model.modeling import missing_shards_message
        from ..model.shards import missing_shards

        try:
            missing = missing_shards(cfg.model_path)
        except ChatTSTrainError as e:  # no index and no single file
            problems.append(str(e))
        else:
            if missing:
                problems.append(missing_shards_message(cfg.model_path, missing))
    if os.path.isfile(cfg.output_dir):
        problems.append(f"--output_dir {cfg.output_dir} is a file; give a folder")
    elif not (cfg.resume or cfg.overwrite_output_dir) and any(
            os.path.exists(os.path.join(cfg.output_dir, f)) for f in ("run.json", "metrics.jsonl", "checkpoints")):
        problems.append(f"--output_dir {cfg.output_dir} holds a run already: continue it with --resume, start over "
                        f"with --overwrite_output_dir (its checkpoints are deleted), or pick another folder")
    unknown = [t for t in cfg.lora_target_list if t not in LORA_TARGETS]
    if unknown or not cfg.lora_target_list:
        problems.append(f"--lora_targets {cfg.lora_targets!r}: choose from {', '.join(LORA_TARGETS)}")
    if cfg.plan not in PLAN_MODES:
        problems.append(f"--plan {cfg.plan!r}: use auto (the fastest that fits) or reference")
    if cfg.zero_stage not in (None, 1, 2, 3):
        problems.append(f"--zero_stage {cfg.zero_stage}: use 1 or 2 (frozen base whole on every GPU; 1 is faster "
                        f"with LoRA) or 3 (partitioned)")
    if cfg.zero_stage in (1, 2) and cfg.offload in ("param", "all"):
        problems.append(f"--zero_stage {cfg.zero_stage} keeps the base on every GPU, so it cannot offload it: drop "
                        f"--offload param or use --zero_stage 3")
    if cfg.compile_layers and cfg.zero_stage == 3:
        problems.append("--compile_layers true needs --zero_stage 1 or 2: ZeRO-3 gathers weights inside a layer, "
                        "between its Linears, where a compiled graph cannot stop")
    if cfg.recompute_layers is not None and cfg.recompute_layers < 0:
        problems.append(f"--recompute_layers {cfg.recompute_layers}: must be >= 0 (0: none recomputed)")
    if cfg.card not in (None, "", "auto"):
        from ..fit.cards import card_named

        try:
            if cfg.bf16 and not card_named(cfg.card).bf16:
                problems.append(f"--bf16 on --card {cfg.card}: that card has no bf16; use --fp16 true")
        except ChatTSTrainError as e:
            problems.append(str(e))
    if cfg.attn_implementation not in ATTENTION:
        problems.append(f"--attn_implementation {cfg.attn_implementation!r}: use sdpa, eager or flash_attention_2")
    for name, ok, need in (("lora_rank", cfg.lora_rank > 0, "> 0"), ("cutoff_len", cfg.cutoff_len > 0, "> 0"),
                           ("learning_rate", cfg.learning_rate > 0, "> 0 (0 would train nothing)"),
                           ("encoder_lr", cfg.encoder_lr is None or cfg.encoder_lr >= 0, ">= 0"),
                           ("val_size", cfg.val_size >= 0, ">= 0"), ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"),
                           ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
                           ("num_epochs", cfg.num_epochs > 0 or cfg.max_steps > 0, "> 0 (or --max_steps > 0)"),
                           ("save_steps", cfg.save_steps >= 0, ">= 0"), ("keep_checkpoints", cfg.keep_checkpoints >= 1, ">= 1")):
        if not ok:
            problems.append(f"--{name} {getattr(cfg, name)}: must be {need}")
    if problems:
        raise ConfigError(problems)


def parse_config(cls, argv: Optional[list[str]] = None):
    """The dataclass (or a tuple of them) from the command line, through transformers' HfArgumentParser
    (typed `--field value` options, booleans as `--flag` or `--flag false`); unknown options are an error."""
    from transformers import HfArgumentParser

    from ..errors import ConfigError

    from dataclasses import fields

    from .llamafactory import translate

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]  # the launcher's
    classes = cls if isinstance(cls, tuple) else (cls,)
    if TrainConfig in classes:  # ChatTS-Training's options and YAML files, in our terms
        argv = translate(argv, {f.name for c in classes for f in fields(c)})
    *parsed, unknown = HfArgumentParser(cls).parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ConfigError([f"unknown option(s) {' '.join(unknown)}; see --help for the options"])
    return parsed[0] if len(parsed) == 1 else tuple(parsed)


__all__ = ["TrainConfig", "check_config", "parse_config"]
