"""A tiny ChatTS checkpoint in exactly the published format, for tests and the demo.

Same config keys, same state-dict keys, fp16 weights in sharded safetensors with an index, and the
Qwen2.5 tokenizer with `<ts>` / `<ts/>` at their real ids; only the sizes are small and weights random.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from ..model.modeling import ChatTSConfig, ChatTSForCausalLM
from ..model.published import TINY, chatts_config
from .tokenizer import build_qwen_tokenizer

_TOKENIZER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "chatts_train", "qwen2.5-tokenizer")


def save_sharded(state_dict: dict[str, torch.Tensor], out_dir: str, num_shards: int) -> None:
    """Write `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`."""
    keys = list(state_dict)
    total = len(keys)
    per = -(-total // num_shards)
    weight_map = {}
    for k in range(num_shards):
        name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state_dict[n].contiguous() for n in keys[k * per:(k + 1) * per]}
        save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({n: name for n in part})
    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f, indent=2)


def tokenizer_files(out_dir: str, source: Optional[str] = None) -> None:
    """Copy the tokenizer files of `source` (a checkpoint folder), or the stand-in tokenizer, built once per
    machine (a few seconds), into `out_dir`."""
    from transformers import AutoTokenizer

    if source is None:
        source = _TOKENIZER_CACHE
        if not os.path.isfile(os.path.join(source, "tokenizer.json")):
            build_qwen_tokenizer().save_pretrained(source)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)


def write_checkpoint_files(out_dir: str, cfg: dict, tokenizer: Optional[str] = None) -> None:
    """Everything of a published checkpoint folder except the weights: config, generation config, tokenizer."""
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                   "do_sample": False}, f, indent=2)
    tokenizer_files(out_dir, tokenizer)


def make_tiny_checkpoint(out_dir: str, release: str = "0801", seed: int = 0, num_shards: int = 3,
                         **overrides) -> str:
    """Write a tiny random ChatTS checkpoint of `release` ("0801" or "legacy") to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = chatts_config(release, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = ChatTSForCausalLM(ChatTSConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    save_sharded({k: v.half() for k, v in model.state_dict().items()}, out_dir, num_shards)
    write_checkpoint_files(out_dir, cfg)
    return out_dir
