"""What the first step's compiling costs on a second run: decoder layers compiled as the loop compiles them (PEFT
LoRA on q/k/v, the lean activations, `compile_layers`), in fresh processes one after another over one Inductor
cache folder, each printing its first forward and backward's seconds and `compile_report()` as a JSON line.

    python benchmarks/compile_cache.py [--runs 2] [--layers 6] [--custom_autograd_cache false] [--cache_dir DIR]
        [--device cuda] [--profile FILE] [--start_workers SECONDS]

The tiny model's shape with `--layers` decoder layers, on `--device` (the CPU: Inductor's C++ kernels; cuda: Triton's,
in fp16). `--profile FILE`: the last run's first forward and backward under cProfile, its 60 costliest calls
(cumulative, then by own time) written to FILE and the raw stats to FILE.pstats: where a run over warm caches still
spends its seconds. `--custom_autograd_cache false`
turns off, after `compile_layers`, what it turns on: AOTAutograd's on-disk cache for graphs holding custom autograd
Functions (RESULTS.md "The first step"). `--start_workers S`: Inductor's compile workers started and answering, then
S seconds more, before the first compile (an experiment: would a run that started them while its model loads find
them ready?); the line says how long they took to answer (`workers_ready_s`). Each line has Inductor's counters of
how its Triton kernels were had (`counters`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def start_compile_workers() -> float:
    """Start Inductor's compile worker processes now and return the seconds until they answer. Until then Inductor
    compiles (or loads) each Triton kernel in the compiling process, one after another. An experiment: a run could
    start them while its model loads."""
    from torch._inductor.async_compile import AsyncCompile

    t = time.perf_counter()
    AsyncCompile.warm_pool()
    if hasattr(AsyncCompile, "wakeup"):  # a sidecar pool starts its workers only when woken
        AsyncCompile.wakeup()
    AsyncCompile.wait_pool_ready(timeout=300)
    return round(time.perf_counter() - t, 2)


def inductor_counters() -> dict:
    """Inductor's counters that say how the kernels were had: compiled here, in a worker, or launched from the
    cache's bundle."""
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if "triton" in k or "async_compile" in k or "autotune" in k}


def one_run(layers: int, custom_autograd_cache: bool, device: str = "cpu", profile: str = "",
            start_workers: float = -1) -> dict:
    import cProfile
    import pstats

    import torch
    import torch._functorch.config as aot_config
    from peft import LoraConfig, get_peft_model

    from chatts_train.fit.compiled_layers import compile_layers, compile_report
    from chatts_train.fit.lean_activations import keep_fewer_activations
    from chatts_train.model.modeling import ChatTSConfig, ChatTSForCausalLM
    from chatts_train.model.published import TINY, chatts_config

    workers_ready_s = None
    if start_workers >= 0:  # Inductor's compile workers up, then this many seconds more before the first compile
        workers_ready_s = start_compile_workers()
        time.sleep(start_workers)

    raw = chatts_config("0801", **{**TINY, "num_hidden_layers": layers, "max_window_layers": layers})
    raw.pop("model_type")
    config = ChatTSConfig(**raw)
    config._attn_implementation = "sdpa"
    base = ChatTSForCausalLM(config).to(device, torch.float16 if device == "cuda" else torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    keep_fewer_activations(model.base_model.model)
    model.enable_input_require_grads()  # as prepare_engine: every layer's input requires grad
    compile_layers(model.base_model.model.model.layers)
    aot_config.autograd_cache_allow_custom_autograd_functions = custom_autograd_cache
    model.train()
    seconds = []
    for n in (40, 64):  # a second length, a multiple of 8 as the plan pads: no new graph (dynamic positions)
        profiler = cProfile.Profile() if profile and not seconds else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        out = model.base_model.model.model(input_ids=torch.randint(0, 1000, (1, n), device=device), use_cache=False)
        out.last_hidden_state.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - t, 2))
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile + ".pstats")  # for callers and callees, read back with pstats
            with open(profile, "w") as f:
                pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(80)
                pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
    return {"first_call_s": seconds[0], "second_length_s": seconds[1], "workers_ready_s": workers_ready_s,
            "counters": inductor_counters(), "compiled": compile_report()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--custom_autograd_cache", choices=["true", "false"], default="true")
    p.add_argument("--cache_dir", default=None, help="Inductor's cache folder (default: a new one, empty)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda")
    p.add_argument("--profile", default="", help="the last run's first call under cProfile: its costliest calls to this file")
    p.add_argument("--start_workers", type=float, default=-1,
                   help="start Inductor's compile workers this many seconds before compiling (-1: not)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one_run(a.layers, a.custom_autograd_cache == "true", a.device, a.profile, a.start_workers)),
              flush=True)
        return
    cache = a.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    for run in range(1, a.runs + 1):
        last = ["--profile", a.profile] if a.profile and run == a.runs else []
        out = subprocess.run([sys.executable, __file__, "--child", "--layers", str(a.layers), "--custom_autograd_cache",
                              a.custom_autograd_cache, "--device", a.device, "--start_workers", str(a.start_workers),
                              *last], env=env, capture_output=True, text=True, check=True)
        print(json.dumps({"run": run, "cache_dir": cache, **json.loads(out.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
