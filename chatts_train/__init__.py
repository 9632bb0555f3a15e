"""chatts-train: LoRA fine-tuning of ChatTS-14B with a hand-written DeepSpeed loop.

Everything a custom loop needs is importable from here; `train()` is the whole job. Names are imported on
first use, so `import chatts_train.errors` or `chatts-train --help` does not pay for DeepSpeed.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "adapter": ["read_adapter", "save_adapter", "trainable_state_dict"],
    "checkpoint": ["load_resume", "save_resume"],
    "batching": ["collate", "pack"],
    "config": ["TrainConfig", "check_config", "parse_config"],
    "data": ["DataIndex", "SampleReader", "epoch_order", "index_data", "resolve_sources", "split"],
    "dsconfig": ["load_ds_config"],
    "engine": ["build_engine", "check_training_mode", "describe_setup", "init_process", "prepare_engine"],
    "errors": ["ChatTSTrainError", "CheckpointError", "DataError", "TrainingError"],
    "loading": ["build_model"],
    "lora": ["add_lora"],
    "loop": ["micro_step", "step_token_scale", "train"],
    "modeling": ["ChatTSConfig", "ChatTSForCausalLM", "load_model"],
    "plan": ["Cards", "Pins", "Plan", "Shape", "apply_to_ds", "choose", "plan_run", "predict_peak_gib", "reference_plan"],
    "processor": ["ChatTSProcessor"],
    "run": ["Run", "index_on_rank0", "setup"],
    "sampler": ["Sampler", "pack_plan"],
    "vocab_parallel": ["cross_entropy_sum", "embedding_lookup"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'chatts_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
