"""One JSON line of what a variant of gpu_variants.sh measured, from its log and its run folder:
memprobe's report (--json is not used: the report is the log's last JSON object), plain_peft.py's,
llamafactory_peer.py's and compile_cache.py's lines,
or the loop's [plan] line, metrics rows, setup.json, summary and (loop_budget.py) budget.json, (micro_step_ab.py) ab.json.

    python benchmarks/variant_result.py NAME RC WALL_S COMMAND LOG RUN_DIR
"""
from __future__ import annotations

import json
import os
import sys


def json_objects(text: str) -> list:
    """Every top-level JSON object printed in `text` (one-line or indented)."""
    out, dec, i = [], json.JSONDecoder(), 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
        i = end
    return out


def main() -> None:
    name, rc, wall, cmd, log, run_dir = sys.argv[1:7]
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    row = {"variant": name, "rc": int(rc), "wall_s": int(wall), "command": cmd}
    plan = [line for line in text.splitlines() if line.startswith("[plan]")]
    if plan or os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        row["plan"] = plan[-1] if plan else None
        for f, key in (("setup.json", "setup"), ("summary.json", "summary"), ("budget.json", "budget"),
                       ("ab.json", "ab")):
            p = os.path.join(run_dir, f)
            row[key] = json.load(open(p)) if os.path.exists(p) else None
        p = os.path.join(run_dir, "metrics.jsonl")
        row["rows"] = [json.loads(x) for x in open(p)] if os.path.exists(p) else []
        row["errors"] = [line for line in text.splitlines() if "error" in line.lower()][-5:]
    else:
        objs = json_objects(text)
        reports = [o for o in objs if "verdict" in o or o.get("recipe") in ("plain_peft", "llamafactory")
                   or "first_call_s" in o]  # memprobe, the peers, compile_cache.py's runs
        row["reports"] = reports if reports else None
        row["tail"] = text[-1500:] if not reports else None
    print(json.dumps(row))


if __name__ == "__main__":
    main()
