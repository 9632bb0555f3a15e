"""Run configuration as a plain dataclass that doubles as the command line (`--field value`)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    # model and data
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
    offload: Optional[str] = None  # none | param | optimizer | all; overrides the DeepSpeed config
    gradient_checkpointing: bool = True
    gpu_memory_cap_gib: Optional[float] = None  # cap each process's PyTorch memory (emulate a smaller card)
    attn_implementation: Optional[str] = None  # sdpa (default), flash_attention_2 (sm80+), eager
    seed: int = 42
    # saving and logging
    save_steps: int = 50  # adapter + resume checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2  # resume checkpoints kept on disk
    resume: bool = False  # continue from the latest resume checkpoint in output_dir
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss before the run stops
    plot: bool = True  # PNG of the curves at the end (needs matplotlib)
    tensorboard: bool = True  # when tensorboard is installed
    eval_at_end: bool = False  # generate on the held-out split and score it (needs val_size)
    eval_max_new_tokens: int = 128

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` option per field, typed from the annotation, defaulting to the field's default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        if args and type(None) in args:  # Optional[X]
            kind = next(a for a in args if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, default=default, nargs="?", const=True,
                                metavar="BOOL")
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default)


def from_args(cls: type, namespace: argparse.Namespace):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def parse_config(cls: type, argv: Optional[list[str]] = None, description: str = ""):
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_args(parser, cls)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return from_args(cls, parser.parse_args(argv))


__all__ = ["TrainConfig", "parse_config", "add_dataclass_args", "from_args"]
