"""The published ChatTS-14B config.json of each release, as plain dicts.

Used to build the 14B shape from config alone (memory and speed probes) and, shrunk, the tiny stand-in
checkpoint. Values from the public checkpoints (see shared/CHATTS_FORMAT.md).
"""
from __future__ import annotations

import copy

_QWEN25_14B = {
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 13824,
    "max_position_embeddings": 32768,
    "max_window_layers": 48,
    "num_attention_heads": 40,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
    "transformers_version": "4.52.4",
    "ignore_index": -100,
    "ts_token_start_index": 151665,
    "ts_token_end_index": 151666,
}

_AUTO_MAP = {
    "AutoConfig": "configuration_qwen2.Qwen2TSConfig",
    "AutoModelForCausalLM": "modeling_qwen2.Qwen2TSForCausalLM",
    "AutoProcessor": "processing_qwen2_ts.Qwen2TSProcessor",
}

RELEASES = {
    "0801": {
        **_QWEN25_14B,
        "architectures": ["Qwen2TSForCausalLM"],
        "auto_map": _AUTO_MAP,
        "model_type": "chatts",
        "ts": {"patch_size": 8, "num_features": 2, "num_layers": 5, "hidden_size": 5120, "embedding_dim": 16,
               "max_length": 32768, "max_sequence_length": 32768, "use_position_embedding": True,
               "use_position_idx": False},
    },
    "legacy": {
        **_QWEN25_14B,
        "architectures": ["Qwen2TSForCausalLM"],
        "auto_map": _AUTO_MAP,
        "model_type": "qwen2",
        "ts": {"patch_size": 16, "num_features": 2, "num_layers": 5, "hidden_size": 5120, "max_length": 2048},
    },
}

# Small enough to train on two CPU processes in seconds; vocabulary, special ids and the `ts` block stay real.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_window_layers": 2}


def chatts_config(release: str = "0801", **overrides) -> dict:
    """config.json of the 14B release, with `overrides` (the `ts` hidden size follows `hidden_size`)."""
    if release not in RELEASES:
        raise ValueError(f"unknown ChatTS release {release!r}: choose one of {', '.join(RELEASES)}")
    cfg = copy.deepcopy(RELEASES[release])
    cfg.update(overrides)
    cfg["ts"]["hidden_size"] = cfg["hidden_size"]
    return cfg
