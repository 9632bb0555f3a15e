"""The users' whole job on 2 x 2080 Ti 22 GB (PCIe 3.0), from a memprobe report made with --profile on any
card, and the users' data for the sample lengths (unpacked and packed):

    python benchmarks/estimate_job.py benchmarks/results/h200x2/memprobe/param_cap22_4096.s6.json --data gdsh,hbsn,whlj,zhlh \
        --dataset-dir data --tokenizer checkpoints/ChatTS-14B

The model (`estimate_job`, which memprobe also puts in every profiled report): measured bytes per micro-step
over 16 GB/s, compute at the measured share of peak FLOPs on 57 TFLOPS, the measured idle time of ZeRO-3's
hooks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PEAK_TFLOPS = {"2080 Ti": 57, "H100": 989, "H200": 989}  # dense fp16 with fp32 accumulate
PCIE3_BYTES_S = 16e9  # the users' 2 x 2080 Ti: PCIe 3.0 x16, no NVLink
GiB = 1024 ** 3


def flops_per_micro_step(cfg: dict, seq_len: int, recomputed: float = 1.0) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per GPU per micro-step of LoRA training. Frozen weights need no
    weight gradients: forward 2N + input-gradient backward 2N per token for the Linear layers; attention
    (causal) 2 T^2 h per layer forward, twice that backward. Hardware FLOPs add the recompute of the
    `recomputed` share of the layers (the plan's recompute_layers / layers; 0 without checkpointing: then
    HFU equals MFU, where it used to count a full recompute that never ran)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    attn_fwd = 2 * seq_len * seq_len * h * layers
    model = 4 * linear * seq_len + 3 * attn_fwd
    return model, model + recomputed * (2 * linear * seq_len + attn_fwd)


def estimate_job(a, cfg: dict, rep: dict) -> dict:
    """The users' whole job (samples x epochs on `--num-gpus` 2080 Ti over PCIe 3.0), from what this run
    measured: bytes per micro-step (card-independent), the compute kernels' share of peak FLOPs (assumed to
    carry over to the 57 TFLOPS of a 2080 Ti) and the idle time of ZeRO-3's hooks. Per micro-step the
    estimate runs from perfect overlap, max(compute, link), to none, compute + link + idle. Without --data
    every sample is taken at the probed length (an upper bound)."""
    import numpy as np

    from chatts_train.data.sampler import pack_plan

    budget = rep["budget"]
    _, hw = flops_per_micro_step(cfg, rep["seq_len"])
    efficiency = hw / budget["compute_busy_s"] / (PEAK_TFLOPS[rep.get("card") or "H200"] * 1e12)
    gathered = rep["link_bytes_per_micro_step"].get("all_gather", 0)
    sent = sum(rep["link_bytes_per_micro_step"].values())
    # parameter offload copies this rank's part of every gathered weight to the GPU first: 1/(w-1) of its link bytes
    h2d = gathered / max(a.num_gpus - 1, 1) if rep["offload"] == "param" else 0
    link_s = (sent + h2d) / PCIE3_BYTES_S
    lengths = np.array(getattr(a, "lengths", None) or [rep["seq_len"]] * a.samples)

    def job(step_lengths) -> tuple[float, float]:
        compute = np.array([flops_per_micro_step(cfg, int(n))[1] for n in step_lengths]) / (
            PEAK_TFLOPS["2080 Ti"] * 1e12 * efficiency)
        scale = a.epochs / a.num_gpus
        return (float(np.maximum(compute, link_s).sum() * scale / 60),
                float((compute + link_s + budget["idle_s"]).sum() * scale / 60))

    # packed as the loop packs a shuffled epoch (--packing)
    packs = [int(lengths[p].sum()) for p in pack_plan(lengths, np.random.default_rng(0).permutation(len(lengths)), a.cutoff_len)]
    unpacked, packed = job(lengths), job(packs)
    return {"offload": rep["offload"], "samples": int(len(lengths)), "epochs": a.epochs, "gpus": a.num_gpus,
            "compute_efficiency": round(efficiency, 3), "link_gib_per_micro_step": round((sent + h2d) / GiB, 2),
            "link_s_per_micro_step": round(link_s, 2), "idle_s_per_micro_step": budget["idle_s"],
            "unpacked_minutes": [round(x, 1) for x in unpacked], "packs": len(packs),
            "packed_minutes": [round(x, 1) for x in packed], "users_expectation_minutes": [30, 45]}


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
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from chatts_train.model.published import chatts_config
    from memprobe import size_from_data

    size_from_data(a)
    print(json.dumps(estimate_job(a, chatts_config("0801"), rep), indent=1))


if __name__ == "__main__":
    main()
