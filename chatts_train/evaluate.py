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

from .data import index_data, resolve_sources, split
from .generate import generate, load_for_inference

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


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per dataset (and "all"): samples and mean of each score (numeric over samples that have numbers)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["dataset"]].append(r)
        groups["all"].append(r)
    out = {}
    for name, rs in groups.items():
        nums = [r["numeric"] for r in rs if r["numeric"] is not None]
        out[name] = {"samples": len(rs), "exact": round(float(np.mean([r["exact"] for r in rs])), 3),
                     "keyword": round(float(np.mean([r["keyword"] for r in rs])), 3),
                     "numeric": round(float(np.mean(nums)), 3) if nums else None, "numeric_samples": len(nums)}
    return out


def format_table(summary: dict[str, dict]) -> str:
    lines = [f"{'dataset':<12}{'samples':>8}{'exact':>8}{'keyword':>9}{'numeric':>9}"]
    for name, s in summary.items():
        num = "-" if s["numeric"] is None else f"{s['numeric']:.3f}"
        lines.append(f"{name:<12}{s['samples']:>8}{s['exact']:>8.3f}{s['keyword']:>9.3f}{num:>9}")
    return "\n".join(lines)


def held_out(data: str, dataset_dir: str, processor, cutoff_len: int, val_size: float, seed: int) -> list[dict]:
    """The eval split exactly as training made it (same data, cutoff, val_size and seed)."""
    index = index_data(resolve_sources(data, dataset_dir), processor, cutoff_len)
    _, val_ids = split(index, val_size, seed)
    samples = []
    for i in val_ids:
        src = index.sources[index.source[i]]
        with open(src.path, "rb") as f:
            f.seek(int(index.offset[i]))
            obj = json.loads(f.readline())
        c = src.columns
        samples.append({"dataset": src.name, "line": int(index.line[i]), "input": obj[c["prompt"]],
                        "output": obj[c["response"]], "timeseries": obj[c["timeseries"]]})
    return samples


def run_eval(a: argparse.Namespace) -> dict:
    model, processor, device = load_for_inference(a.model, a.adapter, a.device)
    samples = held_out(a.data, a.dataset_dir, processor, a.cutoff_len, a.val_size, a.seed)
    rows = []
    for i in tqdm(range(0, len(samples), a.batch_size), desc="eval"):
        chunk = samples[i:i + a.batch_size]
        answers = generate(model, processor, [(s["input"], s["timeseries"]) for s in chunk], device,
                           max_new_tokens=a.max_new_tokens)
        for s, pred in zip(chunk, answers):
            rows.append({"dataset": s["dataset"], "line": s["line"], "input": s["input"], "reference": s["output"],
                         "prediction": pred, **score(pred, s["output"])})
    summary = summarise(rows)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(os.path.join(a.out, "eval_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table(summary))
    print(f"per-sample results in {os.path.join(a.out, 'eval_samples.jsonl')}")
    return summary
