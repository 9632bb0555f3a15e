"""The model for training: built under ZeRO-3 so no rank holds all of it, each rank filling its own
partitions from the checkpoint (or, for probes, the shape alone with random values)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig
from transformers.modeling_utils import no_init_weights

from .dsconfig import precision
from .hostmem import partitions_pinned_in_chunks
from ..model.modeling import ChatTSConfig, ChatTSForCausalLM, check_checkpoint
from .vocab_parallel import SlicedVocabulary
from .weights import load_into_partitions, load_whole, partitions_of


class PartitionOnlyInit(deepspeed.zero.Init):
    """`zero.Init` without its broadcast of each new parameter from rank 0, which is there so that random
    initial values agree across ranks. Every value here is read from the checkpoint, or filled per partition,
    right after: the broadcast would only cost set-up a model's worth of traffic (29.8 GB on 14B). (It was
    suspected of set-up's GPU peak; that was the fp32 construction, see `default_dtype`.)"""

    def _zero_init_param(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()


def build_model(model_path: Optional[str], ds: dict, attention: str = "sdpa",
                config: Optional[ChatTSConfig] = None,
                device: Optional[torch.device] = None) -> tuple[ChatTSForCausalLM, Optional[HfDeepSpeedConfig]]:
    """The ChatTS model in the run's dtype. Under ZeRO-3 it is built inside `zero.Init` (each rank
    materialises only its partition) and each rank reads its partition straight from the checkpoint
    (`weights.py`). Otherwise (ZeRO-1 or -2: the frozen base whole on every GPU) it is made uninitialised on
    `device` and each tensor is copied there from the memory-mapped shards, one at a time: no fp32 copy, no
    pass through host RAM beyond a tensor (from_pretrained took 130 s to a 14B step that way). With `config`
    (the path is then unused): the shape alone, filled with small random values (memory and speed probes:
    values do not matter there, NaNs from uninitialised memory would).

    Keep the returned `HfDeepSpeedConfig` alive as long as the model: transformers holds it by weakref."""
    dtype = precision(ds)
    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None
    shape_only = config is not None
    if not shape_only:
        config = check_checkpoint(model_path)
    config._attn_implementation = attention  # the plan's (plan.Plan.attention)
    with no_init_weights():
        if zero3:
            # No dtype argument: DeepSpeed 0.18 then takes it from the config (fp16 / bf16 / fp32), whereas an
            # explicit one is ignored on accelerators without fp16 (the CPU: bf16 instead of fp32).
            with partitions_pinned_in_chunks(), default_dtype(dtype), PartitionOnlyInit(config_dict_or_path=ds):
                model = ChatTSForCausalLM(config)
        else:
            with torch.device(device or "cpu"), default_dtype(dtype):
                model = ChatTSForCausalLM(config)
    if shape_only:
        fill_random(model)
    elif zero3:
        load_into_partitions(model, model_path)
    else:
        load_whole(model, model_path)
    if zero3:
        model.vocabulary = SlicedVocabulary()  # the vocabulary matrices read from each rank's slice
    return model, hf_ds


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created in `dtype`: zero.Init makes each one whole on the GPU before partitioning it, in
    torch's default dtype, and then converts it. In fp32 that was a vocabulary matrix's fp32 original and fp16
    copy at once (2.9 + 1.45 GiB on 14B), the peak of set-up (HISTORY.md section 5: the set-up trace)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def fill_random(model: torch.nn.Module) -> None:
    """Small random values, cheaply: each rank fills only its own ZeRO-3 partition, where it lives."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            for t in [part for part, _, _ in partitions_of(p)] if hasattr(p, "ds_tensor") else [p.data]:
                if n.endswith("norm.weight"):
                    t.fill_(1.0)
                else:
                    t.uniform_(-0.02, 0.02)
