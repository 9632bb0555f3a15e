"""chatts-train: LoRA fine-tuning of ChatTS-14B with a hand-written DeepSpeed loop.

Everything a custom loop needs is importable from here; `train()` is the whole job. Names are imported on
first use, so `import chatts_train.errors` or `chatts-train --help` does not pay for DeepSpeed.

The folders, each built only on those before it: `model` (ChatTS and its inputs), `data` (indexing,
sampling), `fit` (the plan and fitting 14B onto the cards), `formats` (the adapter and run record a run
leaves), `use` (generate, evaluate, merge), `training` (the loop and all it needs); `errors`, `tokens` and
`ranks` are below them all, `cli` above. `standins` makes the tiny checkpoint and the synthetic data.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "formats.adapter": ["read_adapter", "save_adapter", "trainable_state_dict"],
    "training.checkpoint": ["load_resume", "save_resume"],
    "model.batching": ["collate", "pack"],
    "training.config": ["TrainConfig", "check_config", "parse_config"],
    "data.indexing": ["DataIndex", "SampleReader", "epoch_order", "index_data", "resolve_sources", "split"],
    "fit.dsconfig": ["load_ds_config"],
    "training.engine": ["build_engine", "check_training_mode", "describe_setup", "init_process", "prepare_engine"],
    "errors": ["ChatTSTrainError", "CheckpointError", "DataError", "TrainingError"],
    "fit.loading": ["build_model"],
    "training.lora": ["add_lora"],
    "training.loop": ["micro_step", "step_token_scale", "train"],
    "model.modeling": ["ChatTSConfig", "ChatTSForCausalLM", "load_model"],
    "fit.plan": ["Cards", "Pins", "Plan", "Shape", "apply_to_ds", "choose", "plan_run", "predict_peak_gib", "reference_plan"],
    "model.processor": ["ChatTSProcessor"],
    "training.run": ["Run", "index_on_rank0", "setup"],
    "data.sampler": ["Sampler", "pack_plan"],
    "fit.vocab_parallel": ["cross_entropy_sum", "embedding_lookup"],
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
