"""Scoring generated answers against references, and `chatts-train eval` on a held-out split.

Scores per sample: exact match; keyword match (share of the reference's words, or CJK runs, found in the
answer; for short categorical answers this is the choice match); numeric closeness as in ChatTS's own
evaluation, clip(1 - |pred - ref| / |ref|, 0, 1), number by number in order (None when the reference has
no number).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..data.indexing import index_data, read_sample, resolve_sources, split
from ..errors import DataError
from .generate import generate, load_for_inference
from ..formats.run_record import held_out_ids, read_run_record

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]{2,}|[\u4e00-\u9fff]+")
_STOP = {"the", "is", "a", "an", "at", "of", "in", "and", "or", "to", "it", "its", "about", "around", "yes", "no",
         "there", "this", "that", "series", "point"}


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower()).rstrip("。.!！")


def exact(pred: str, ref: str) -> float:
    return float(_norm(pred) == _norm(ref))


def keywords(pred: str, ref: str) -> float:
    words = [w for w in _WORD.findall(_NUMBER.sub(" ", ref.lower())) if w not in _STOP]
    if not words:
        return exact(pred, ref)
    p = pred.lower()
    return sum(w in p for w in words) / len(words)


def numeric(pred: str, ref: str) -> Optional[float]:
    refs = [float(x) for x in _NUMBER.findall(ref)]
    if not refs:
        return None
    preds = [float(x) for x in _NUMBER.findall(pred)]
    scores = []
    for i, r in enumerate(refs):
        if i >= len(preds):
            scores.append(0.0)
        elif r == 0:
            scores.append(float(preds[i] == 0))
        else:
            scores.append(float(np.clip(1 - abs(preds[i] - r) / abs(r), 0, 1)))
    return float(np.mean(scores))


def score(pred: str, ref: str) -> dict:
    return {"exact": exact(pred, ref), "keyword": keywords(pred, ref), "numeric": numeric(pred, ref)}


def score_by_dataset(rows: list[dict]) -> dict[str, dict]:
    """Per dataset (and "all"): samples and mean of each score (numeric over samples that have numbers)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["dataset"]].append(r)
        groups["all"].append(r)
    out = {}
    for name, rs in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        nums = [r["numeric"] for r in rs if r["numeric"] is not None]
        out[name] = {"samples": len(rs), "exact": round(float(np.mean([r["exact"] for r in rs])), 3),
                     "keyword": round(float(np.mean([r["keyword"] for r in rs])), 3),
                     "numeric": round(float(np.mean(nums)), 3) if nums else None, "numeric_samples": len(nums)}
    return out


def format_scores(summary: dict[str, dict]) -> str:
    lines = [f"{'dataset':<12}{'samples':>8}{'exact':>8}{'keyword':>9}{'numeric':>9}"]
    for name, s in summary.items():
        num = "-" if s["numeric"] is None else f"{s['numeric']:.3f}"
        lines.append(f"{name:<12}{s['samples']:>8}{s['exact']:>8.3f}{s['keyword']:>9.3f}{num:>9}")
    return "\n".join(lines)


def format_before_after(before: dict[str, dict], after: dict[str, dict]) -> str:
    """Two score summaries of the same samples side by side: what training changed."""
    lines = [f"{'dataset':<12}{'samples':>8}{'exact before':>14}{'after':>7}{'keyword before':>16}{'after':>7}"]
    for name, a in after.items():
        b = before.get(name, {"exact": float("nan"), "keyword": float("nan")})
        lines.append(f"{name:<12}{a['samples']:>8}{b['exact']:>14.3f}{a['exact']:>7.3f}{b['keyword']:>16.3f}"
                     f"{a['keyword']:>7.3f}")
    return "\n".join(lines)


def read_samples(index, ids) -> list[dict]:
    """The indexed samples `ids` as dicts (dataset, line, input, output, timeseries)."""
    samples = []
    for i in ids:
        text, answer, series = read_sample(index, i)
        samples.append({"dataset": index.sources[index.source[i]].name, "line": int(index.line[i]), "input": text,
                        "output": answer, "timeseries": series})
    return samples


def evaluate_samples(model, processor, samples: list[dict], device, batch_size: int = 8, max_new_tokens: int = 256,
                     rank: int = 0, world: int = 1) -> list[dict]:
    """Generate and score. With world > 1 (the end of a ZeRO-3 run) every rank answers its share with
    `synced_gpus`, in the same number of batches, and rank 0 gets all rows (the others get [])."""
    mine = list(range(rank, len(samples), world))
    per_rank = -(-len(samples) // world)
    mine += [mine[0] if mine else 0] * (per_rank - len(mine))  # equal work on every rank; extras dropped below
    rows = []
    for i in tqdm(range(0, len(mine), batch_size), desc="eval", disable=rank != 0):
        chunk = mine[i:i + batch_size]
        answers = generate(model, processor, [(samples[j]["input"], samples[j]["timeseries"]) for j in chunk], device,
                           max_new_tokens=max_new_tokens, synced_gpus=world > 1)
        for j, pred in zip(chunk, answers):
            s = samples[j]
            rows.append({"index": j, "dataset": s["dataset"], "line": s["line"], "input": s["input"],
                         "reference": s["output"], "prediction": pred, **score(pred, s["output"])})
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part] if rank == 0 else []
    unique = {r["index"]: r for r in rows}
    return [unique[k] for k in sorted(unique)]


def write_report(rows: list[dict], out_dir: str) -> dict:
    summary = score_by_dataset(rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(os.path.join(out_dir, "eval_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_scores(summary))
    print(f"per-sample results in {os.path.join(out_dir, 'eval_samples.jsonl')}")
    return summary


def run_eval(a: argparse.Namespace) -> dict:
    """The held-out split exactly as training made it: from the run's record (`--run`), or re-created from
    the same data, cutoff, val_size and seed."""
    if a.run:
        record = read_run_record(a.run)
        t = record["train"]
        model, processor, device = load_for_inference(a.model or t["model_path"],
                                                      a.adapter or os.path.join(a.run, "adapter"), a.device)
        index = index_data(resolve_sources(t["data"], t["dataset_dir"]), processor, t["cutoff_len"])
        val_ids = held_out_ids(record, index)
        out = a.out or os.path.join(a.run, "eval")
    else:
        missing = [f"--{k}" for k in ("model", "data", "val_size") if getattr(a, k) is None]
        if missing:
            raise DataError(f"eval needs --run RUN_DIR, or {', '.join(missing)} as in training")
        model, processor, device = load_for_inference(a.model, a.adapter, a.device)
        index = index_data(resolve_sources(a.data, a.dataset_dir), processor, a.cutoff_len)
        _, val_ids = split(index, a.val_size, a.seed)
        out = a.out or "runs/eval"
    if not len(val_ids):
        raise DataError("the run held out no samples (--val_size 0): nothing to evaluate")
    rows = evaluate_samples(model, processor, read_samples(index, val_ids), device, a.batch_size, a.max_new_tokens)
    return write_report(rows, out)
