"""File what a gpu_variants.sh run measured by what it measured: each line of its results.jsonl is appended to
benchmarks/results/<card>/<kind>.jsonl, with the card, the date and a label (what code ran) added.

    python benchmarks/file_results.py RESULTS.JSONL MACHINE.TXT [--label TEXT]

<card> is the GPU count and model from machine.txt (`h200x1`); <kind> follows the variant's name: the loop on
the 14B folder at the users' lengths (`loop_*`, `x2_loop_*`), its budget (`budget_*`), a micro-step by what it is fed (`ab_*`), memprobe (`probe_*`,
`usual_vs_auto`, `x2_probe_*`, `turing_x2_probe*`), the plain PEFT recipe (`plain_peft*`), LLaMA-Factory (`lf_*`), the users' whole job (`job_*`), the first step's compiling
(`compile_cache*`); `turing_loop` is the loop.
"""
from __future__ import annotations

import argparse
import json
import os

KINDS = (("budget_", "loop_budget_users_lengths"), ("x2_loop_", "loop_users_lengths"), ("loop_", "loop_users_lengths"),
         ("x2_probe_", "memprobe"), ("probe_", "memprobe"), ("usual_vs_auto", "memprobe"), ("plain_peft", "plain_peft"),
         ("lf_", "llamafactory"), ("job_", "whole_job"),
         ("ab_", "micro_step_ab"), ("turing_loop", "loop_users_lengths"), ("turing_x2_probe", "memprobe"),
         ("compile_cache", "compile_cache"))
HERE = os.path.dirname(os.path.abspath(__file__))


def card_of(machine_txt: str) -> str:
    """`h200x1` from machine.txt's nvidia-smi lines ("NVIDIA H200, 143771 MiB, 580.159.04", one per GPU)."""
    gpus = [line.split(",")[0] for line in open(machine_txt) if line.startswith("NVIDIA")]
    model = gpus[0].replace("NVIDIA", "").split()[0].lower() if gpus else "cpu"
    return f"{model}x{len(gpus)}"


def machine_date(machine_txt: str) -> str:
    from datetime import datetime

    for line in open(machine_txt):
        try:
            return datetime.strptime(line.strip(), "%a %b %d %I:%M:%S %p %Z %Y").date().isoformat()
        except ValueError:
            continue
    return ""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("machine")
    p.add_argument("--label", default="")
    a = p.parse_args()
    card, date = card_of(a.machine), machine_date(a.machine)
    folder = os.path.join(HERE, "results", card)
    os.makedirs(folder, exist_ok=True)
    for line in open(a.results):
        row = json.loads(line)
        kind = next((k for prefix, k in KINDS if row["variant"].startswith(prefix)), None)
        if kind is None:
            continue
        row = {"card": card, "date": date, "label": a.label, **row}
        with open(os.path.join(folder, kind + ".jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['variant']} -> results/{card}/{kind}.jsonl")


if __name__ == "__main__":
    main()
