"""Put a training run's own per-step memory peaks (metrics.jsonl) beside memprobe's for the same sequence
length; one JSON line plus a Markdown row. Used by gpu_variants.sh's x2_real_* variants.

    python benchmarks/loop_vs_probe.py RUN_DIR PROBE_JSON
"""
from __future__ import annotations

import json
import os
import sys


def compare(run_dir: str, probe: dict) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run_dir, "setup.json")) as f:
        setup = json.load(f)
    longest = max(r["max_seq_len"] for r in rows)
    at_longest = [r for r in rows if r["max_seq_len"] == longest]
    loop_alloc = max(max(r["peak_allocated_gib"]) for r in at_longest)
    loop_reserved = max(max(r["peak_reserved_gib"]) for r in at_longest)
    out = {"run": run_dir, "steps": len(rows), "seq_lens": [r["max_seq_len"] for r in rows],
           "loop_peak_allocated_per_step": [max(r["peak_allocated_gib"]) for r in rows],
           "loop_peak_reserved_per_step": [max(r["peak_reserved_gib"]) for r in rows],
           "loop_step_time_s": [r["step_time_s"] for r in rows],
           "loop_tokens_per_s_per_gpu": [r["tokens_per_s_per_gpu"] for r in rows],
           "loop_host_rss_gib": rows[-1]["host_rss_gib"], "loop_host_peak_gib": rows[-1]["host_peak_gib"],
           "loop_host_rss_after_load_gib": setup.get("host_rss_after_load_gib"),
           "loop_host_peak_after_load_gib": setup.get("host_peak_after_load_gib"),
           "longest_seq": longest, "loop_peak_allocated_gib": loop_alloc, "loop_peak_reserved_gib": loop_reserved,
           "probe_ok": probe.get("ok"), "probe_seq_len": probe.get("seq_len"), "probe_verdict": probe.get("verdict")}
    if probe.get("ok") and loop_alloc > 0:
        out.update(probe_peak_allocated_gib=probe["peak_allocated_gib"], probe_peak_reserved_gib=probe["peak_reserved_gib"],
                   probe_device_peak_gib=probe["device_peak_gib"], probe_host_rss_after_load_gib=probe["host_rss_after_load_gib"],
                   allocated_diff_pct=round(100 * (probe["peak_allocated_gib"] - loop_alloc) / loop_alloc, 2),
                   reserved_diff_pct=round(100 * (probe["peak_reserved_gib"] - loop_reserved) / loop_reserved, 2),
                   same_setup=probe.get("setup") == {k: v for k, v in setup.items() if not k.startswith("host_")})
    return out


if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        text = f.read()
    r = compare(sys.argv[1], json.loads(text) if text.strip() else {"ok": False, "verdict": "no report"})
    print(json.dumps(r))
    print(f"| {os.path.basename(r['run'].rstrip('/'))} | {r['longest_seq']} | {r['loop_peak_allocated_gib']:.2f} / "
          f"{r['loop_peak_reserved_gib']:.2f} | {r.get('probe_peak_allocated_gib', '-')} / "
          f"{r.get('probe_peak_reserved_gib', '-')} | {r.get('allocated_diff_pct', '-')}% / "
          f"{r.get('reserved_diff_pct', '-')}% | {r.get('same_setup', '-')} |")
