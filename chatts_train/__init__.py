"""chatts-train: LoRA fine-tuning of ChatTS-14B with a hand-written DeepSpeed loop.

Everything a custom loop needs is importable from here; `train()` is the whole job.
"""
from .checkpoint import load_resume, save_adapter, save_resume, trainable_state_dict
from .collate import collate, pack
from .config import TrainConfig, parse_config
from .data import DataIndex, SampleReader, epoch_order, index_data, resolve_sources, split
from .engine import (add_lora, build_engine, build_model, check_training_mode, describe_setup, init_process,
                     load_ds_config, prepare_engine)
from .errors import ChatTSTrainError, CheckpointError, DataError, TrainingError
from .modeling import ChatTSConfig, ChatTSForCausalLM, load_model
from .processor import ChatTSProcessor
from .loop import index_on_rank0, micro_step, step_token_scale, train
from .schedule import Schedule, pack_plan

__all__ = [
    "ChatTSConfig", "ChatTSForCausalLM", "ChatTSProcessor", "ChatTSTrainError", "CheckpointError", "DataError",
    "DataIndex", "SampleReader", "Schedule", "TrainConfig", "TrainingError", "add_lora", "build_engine", "build_model",
    "check_training_mode", "collate", "describe_setup", "epoch_order", "index_data", "index_on_rank0", "init_process",
    "load_ds_config", "load_model", "load_resume", "micro_step", "pack", "pack_plan", "parse_config", "prepare_engine",
    "resolve_sources", "save_adapter", "save_resume", "split", "step_token_scale", "train", "trainable_state_dict",
]
