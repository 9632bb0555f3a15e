"""The users' whole job on 2 x 2080 Ti 22 GB (PCIe 3.0), from a memprobe report made with --profile on any
card, and the users' data for the sample lengths (unpacked and packed):

    python benchmarks/estimate_job.py benchmarks/results/param_cap22_4096.json --data gdsh,hbsn,whlj,zhlh \
        --dataset-dir data --tokenizer checkpoints/ChatTS-14B

The model is memprobe's `estimate_job`: measured bytes per micro-step over 16 GB/s, compute at the measured
share of peak FLOPs on 57 TFLOPS, the measured idle time of ZeRO-3's hooks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memprobe  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="memprobe --json output of a run with --profile")
    p.add_argument("--data", required=True)
    p.add_argument("--dataset-dir", default="data")
    p.add_argument("--tokenizer", required=True, help="a ChatTS folder with the tokenizer and config.json")
    p.add_argument("--cutoff-len", type=int, default=4096)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--num-gpus", type=int, default=2)
    a = p.parse_args(argv)
    with open(a.report) as f:
        rep = json.load(f)
    if not rep.get("budget"):
        raise SystemExit(f"{a.report} has no micro-step budget: make it with memprobe --profile")
    a.model = None
    memprobe.size_from_data(a)
    from chatts_train.published import chatts_config

    print(json.dumps(memprobe.estimate_job(a, chatts_config("0801"), rep), indent=1))


if __name__ == "__main__":
    main()
