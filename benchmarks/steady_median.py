"""A memprobe report's step time as memprobe computes it since b0d0884: per rank, the median of the micro-steps
after the first optimizer step, leaving out the profiled one (n - 2) when the report was profiled; then the
slower rank. Reports made before that fix kept the profiled micro-step in every rank but rank 0's median, where
rank 1 waited for rank 0's profiler tables (benchmarks/HISTORY.md section 7).

    python benchmarks/steady_median.py benchmarks/results/h200x2/memprobe/*.json
"""
from __future__ import annotations

import json
import sys

from instruments import steady_median


def report_step_time(report: dict) -> float:
    """The slower rank's steady median; a profiled report profiled micro-step n - 2."""
    profiled = report.get("budget") is not None
    medians = []
    for r in report["ranks"]:
        times = r["micro_step_times"]
        medians.append(steady_median(times, len(times) // r["optimizer_steps"], len(times) - 2 if profiled else None))
    return max(medians)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        report = json.load(open(path))
        if report.get("ok") and "ranks" in report:
            print(f"{path}: reported {report['micro_step_s']:.3f} s, steady median {report_step_time(report):.3f} s")
