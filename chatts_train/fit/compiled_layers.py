"""Decoder layers through torch.compile, for plans where nothing runs inside a layer but the layer (ZeRO-1 or -2: the
base whole on the GPU, no per-module hooks).

Op by op, a 14B micro-step at the users' lengths launches ~5,500 kernels one by one from Python, and the GPU
waits on the launches (benchmarks/RESULTS.md, the loop's micro-step budget). Compiled, a layer's forward is one
call of a graph and its backward one more; Inductor fuses the elementwise work (norms, rotary embedding, the
SiLU gate, LoRA's scale-and-add) into fewer kernels.

One graph serves all layers and lengths: the layers run the same code, every layer's input requires grad
(prepare_engine), the number of positions is dynamic and padded to the plan's multiple of 8, so compiling happens
once per kind of call (a recomputed layer's first pass, without autograd, is one more), during the run's first
micro-step: ~13 s on 1 x H200 for the 14B layers when nothing is cached, ~5 s from Inductor's caches on disk
(RESULTS.md "A C++ kernel in a GPU graph").
Under the compiled graphs the lean-activation functions are traced like any other code: Inductor's partitioner
then decides what a layer keeps for backward (RESULTS.md has what that costs in memory).
"""
from __future__ import annotations

from typing import Sequence

import torch


def compile_layers(layers: Sequence[torch.nn.Module], backend: str = "inductor") -> None:
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as aot_config

    # The lean activations are custom autograd Functions, whose graphs AOTAutograd's on-disk cache skips unless
    # allowed (torch's default: off); allowed, a second run on a machine loads the layers' compiled graphs
    # (RESULTS.md "The first step"). The Functions are this package's own, traced into the graphs the cache keys.
    if hasattr(aot_config, "autograd_cache_allow_custom_autograd_functions"):
        aot_config.autograd_cache_allow_custom_autograd_functions = True
    # Under dynamic=True Dynamo passes a layer's float attributes (norm eps, LoRA scalings, attention scale and
    # dropout) as CPU scalar tensors, which gives the graph a C++ kernel: a C++ compile and Inductor's CPU
    # capability probes, ~25 s of every first step even from the caches (RESULTS.md "A C++ kernel in a GPU graph").
    # They are the same in every layer, so as constants they still make one graph.
    dynamo_config.specialize_float = True
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=True)


def is_compiled(layer: torch.nn.Module) -> bool:
    return hasattr(layer.forward, "_torchdynamo_orig_callable")


def compile_report(phases: int = 12) -> dict:
    """What torch.compile did in this process: graphs, seconds compiling (forward graphs when first called,
    backward graphs at their first backward), what Inductor found in its caches on disk, and the `phases`
    costliest of torch's timed compile phases in seconds (nested: a phase's time includes those it calls), which
    say where a first step's compiling went. Empty if nothing was compiled."""
    from torch._dynamo.utils import compilation_time_metrics as seconds, counters

    if not counters["stats"]["unique_graphs"]:
        return {}
    total = {k: round(sum(seconds.get(k, [])), 1) for k in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")}
    timed = sorted(((k, sum(v)) for k, v in seconds.items()), key=lambda kv: -kv[1])[:phases]
    return {"graphs": counters["stats"]["unique_graphs"], "forward_s": total["_compile.compile_inner"],
            "backward_s": total["compile_fx.<locals>.bw_compiler"],
            "autotune_s": round(sum(sum(v) for k, v in seconds.items() if "benchmark_all_configs" in k), 1),
            "fx_cache": {k.split("_")[-1]: n for k, n in counters["inductor"].items() if k.startswith("fxgraph_cache_")},
            "aot_cache": {k.split("_")[-1]: n for k, n in counters["aot_autograd"].items()
                          if k.startswith("autograd_cache_")},
            "phases_s": {k: round(s, 2) for k, s in timed if s >= 0.01}}


def compile_failure(e: BaseException) -> bool:
    """Whether `e` is torch.compile failing (a compiler, Triton or a driver on this machine), not the step."""
    import torch._dynamo.exc as dynamo_exc

    return isinstance(e, (dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError, dynamo_exc.Unsupported))
