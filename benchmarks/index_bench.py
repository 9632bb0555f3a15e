"""Indexing benchmark: 20,000 samples x 5 series x 1,000 points through the data pipeline's index pass.

    python benchmarks/index_bench.py [--samples 20000] [--workdir /tmp/index-bench]

Writes the JSONL once (not timed), builds the stand-in tokenizer checkpoint once, then times
`index_data` (parse, check, normalise, write prefixes, tokenise, expanded lengths) and reports wall time
and peak RSS of this process. Goal on the 2-core CI machine: <= 60 s and <= 2 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--series", type=int, default=5)
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/index-bench")
    a = p.parse_args()
    import numpy as np

    from chatts_train.data.indexing import index_data, resolve_sources
    from chatts_train.model.processor import ChatTSProcessor
    from chatts_train.standins.checkpoint import make_tiny_checkpoint

    os.makedirs(a.workdir, exist_ok=True)
    ckpt = os.path.join(a.workdir, "tiny")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        make_tiny_checkpoint(ckpt)
    path = os.path.join(a.workdir, f"bench_{a.samples}x{a.series}x{a.points}.jsonl")
    if not os.path.isfile(path):
        rng = np.random.default_rng(0)
        with open(path, "w") as f:
            for i in range(a.samples):
                series = np.round(rng.normal(size=(a.series, a.points)).cumsum(1) * 10 + 100, 4)
                ph = " ".join(f"metric {k}: <ts><ts/>" for k in range(a.series))
                f.write(json.dumps({"input": f"Look at {ph}. Which one has an anomaly?",
                                    "output": f"Metric {i % a.series} shows a level shift.",
                                    "timeseries": series.tolist()}) + "\n")
    processor = ChatTSProcessor.from_pretrained(ckpt)
    size_mb = os.path.getsize(path) / 1e6
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    index = index_data(resolve_sources(path), processor, cutoff_len=8192)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": len(index), "file_mb": round(size_mb, 1), "index_s": round(wall, 1),
                      "samples_per_s": round(len(index) / wall), "peak_rss_mb": round(rss),
                      "rss_before_index_mb": round(rss0), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
