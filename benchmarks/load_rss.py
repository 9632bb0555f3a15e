"""Host RAM of loading a ChatTS checkpoint folder under ZeRO-3, per rank: this project's loader (each rank
reads only its partitions, chatts_train/fit/weights.py) against transformers' ZeRO-3 `from_pretrained`.

    torchrun --nproc_per_node 2 benchmarks/load_rss.py --model DIR --loader ours|transformers [--offload param]

Prints one JSON line (rank 0): RSS before and after the load, the peak (ru_maxrss) and the load time per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch

    from chatts_train.fit.dsconfig import load_ds_config
    from chatts_train.training.engine import init_process
    from chatts_train.fit.hostmem import peak_rss_gib, rss_gib
    from chatts_train.fit.loading import build_model
    from chatts_train.training.metrics import gather_named
    from chatts_train.model.modeling import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--loader", choices=["ours", "transformers"], required=True)
    p.add_argument("--offload", choices=["none", "param"], default="param")
    p.add_argument("--ds-config", default=os.path.join(os.path.dirname(__file__), "..", "ds_config.json"))
    a = p.parse_args()

    rank, world, device = init_process(0)
    ds = load_ds_config(a.ds_config, world, fp16=device.type == "cuda", offload=a.offload)
    ds["zero_optimization"]["stage"] = 3  # the two ZeRO-3 loaders compared
    before, t0 = rss_gib(), time.time()
    if a.loader == "ours":
        model, hf_ds = build_model(a.model, ds)
    else:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)
        model = load_model(a.model, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    stats = gather_named({"before": before, "after": rss_gib(), "peak": peak_rss_gib(), "load_s": time.time() - t0},
                         device)
    if rank == 0:
        print(json.dumps({"loader": a.loader, "offload": a.offload, "world": world,
                          "ranks": [{k: round(v, 2) for k, v in r.items()} for r in stats]}), flush=True)
    del model, hf_ds


if __name__ == "__main__":
    main()
