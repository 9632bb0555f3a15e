"""Training data: ChatTS JSONL files and LLaMA-Factory-style folders, indexed once, read lazily.

The index pass reads every line once, checks it, and records its byte offset and its expanded length
(text tokens + one position per encoder row), which is what memory depends on. Samples over the cutoff
are dropped and reported, never cut. Training then reads single lines by offset, so a large dataset
neither sits in RAM nor is parsed twice to start.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import DataError, read_json_object
from ..model.processor import ChatTSProcessor, Encoded, chat_answer, chat_prompt
from ..model.timeseries import TS_PLACEHOLDER, TSSpec, check_series

DEFAULT_COLUMNS = {"prompt": "input", "response": "output", "timeseries": "timeseries"}
OVER_CUTOFF = "over cutoff"


@dataclass
class Source:
    name: str
    path: str
    weight: float = 1.0
    columns: dict = field(default_factory=lambda: dict(DEFAULT_COLUMNS))


def resolve_sources(data: str, dataset_dir: Optional[str] = None) -> list[Source]:
    """`data` is a comma-separated list of JSONL paths or dataset names from `dataset_dir/dataset_info.json`,
    each optionally `:weight` (e.g. `gdsh:2,hbsn,extra.jsonl:0.5`)."""
    info = None
    sources = []
    for item in [s.strip() for s in data.split(",") if s.strip()]:
        name, _, w = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise DataError(f"dataset entry {item!r}: weight {w!r} is not a number (use name:weight)") from None
        if weight <= 0:
            raise DataError(f"dataset entry {item!r}: weight must be positive")
        if os.path.isdir(name):
            raise DataError(f"--data {name} is a folder: pass JSONL files, or dataset names with --dataset_dir {name}")
        if name.endswith((".jsonl", ".json")) or os.sep in name or os.path.isfile(name):
            if not os.path.isfile(name):
                raise DataError(f"data file {name} does not exist")
            sources.append(Source(os.path.splitext(os.path.basename(name))[0], name, weight))
            continue
        if info is None:
            info = _dataset_info(dataset_dir)
        if name not in info:
            raise DataError(f"unknown dataset {name!r}: {dataset_dir}/dataset_info.json lists "
                            f"{', '.join(sorted(info)) or 'nothing'}")
        entry = info[name]
        if not isinstance(entry, dict):
            raise DataError(f"{dataset_dir}/dataset_info.json: entry {name!r} must be an object like "
                            f'{{"file_name": "{name}.jsonl"}}, got {type(entry).__name__}')
        path = os.path.join(dataset_dir, entry.get("file_name", ""))
        if not os.path.isfile(path):
            raise DataError(f"dataset {name!r}: file {path} named in dataset_info.json does not exist")
        sources.append(Source(name, path, weight, {**DEFAULT_COLUMNS, **entry.get("columns", {})}))
    if not sources:
        raise DataError("no datasets given: pass --data with JSONL paths or dataset names")
    return sources


def _dataset_info(dataset_dir: Optional[str]) -> dict:
    path = os.path.join(dataset_dir or ".", "dataset_info.json")
    return read_json_object(path, DataError, f"dataset names need {path}; give --dataset_dir or pass JSONL file paths",
                            "it maps dataset names to {file_name, columns}, as LLaMA-Factory's does")


@dataclass
class Rejected:
    reason: str  # short, for the per-dataset table
    detail: str  # for the file:line report


def parse_line(line: str | bytes, columns: dict, spec: TSSpec) -> tuple[str, str, list[np.ndarray]] | Rejected:
    """(input, output, series), or why the line cannot be trained on."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Rejected("invalid JSON", str(e))
    except UnicodeDecodeError as e:
        return Rejected("not UTF-8", f"bytes that are not UTF-8 ({e.reason} at byte {e.start})")
    if not isinstance(obj, dict):
        return Rejected("invalid JSON", "a line must be one JSON object")
    values = []
    for key, want in ((columns["prompt"], str), (columns["response"], str), (columns["timeseries"], list)):
        if key not in obj:
            return Rejected("missing field", f"no `{key}` field")
        if not isinstance(obj[key], want):
            return Rejected("wrong type", f"`{key}` must be a {want.__name__}, got {type(obj[key]).__name__}")
        values.append(obj[key])
    text, answer, raw_series = values
    if "<ts>" in answer or "<ts/>" in answer:
        return Rejected("placeholder in output", "the answer must not contain `<ts>` / `<ts/>`")
    pairs = text.count(TS_PLACEHOLDER)
    if pairs != text.count("<ts>") or pairs != text.count("<ts/>"):
        return Rejected("placeholder count", "`<ts>` and `<ts/>` must come as `<ts><ts/>` pairs")
    if pairs != len(raw_series):
        return Rejected("placeholder count", f"{pairs} `<ts><ts/>` placeholders for {len(raw_series)} series")
    series = []
    for k, raw in enumerate(raw_series):
        x = check_series(raw, spec)
        if isinstance(x, str):
            reason = "empty series" if x == "empty series" else "bad series"
            return Rejected(reason, f"series {k}: {x}")
        series.append(x)
    return text, answer, series


@dataclass
class DataIndex:
    """One row per kept sample, plus what was dropped and why (per source)."""

    sources: list[Source]
    source: np.ndarray  # int16
    offset: np.ndarray  # int64 byte offset of the line
    line: np.ndarray  # int32, 1-based
    length: np.ndarray  # int32 expanded sequence length
    answer_tokens: np.ndarray  # int32 tokens that carry a loss
    num_series: np.ndarray  # int16
    series_lengths: np.ndarray  # int32, all series of kept samples, flat
    dropped: list[Counter]  # per source: reason -> count
    problems: list[str]  # "file:line: reason: detail", over-cutoff excluded
    spec: TSSpec  # the encoder layout the lengths were computed for

    def __len__(self) -> int:
        return len(self.offset)


def index_data(sources: list[Source], processor: ChatTSProcessor, cutoff_len: int, strict: bool = False,
               chunk: int = 512) -> DataIndex:
    """Read and check every sample once. Problems in single samples are skipped and reported, or raised
    all at once with `strict`; a run never stops halfway over something checkable here."""
    cols: dict[str, list] = {k: [] for k in ("source", "offset", "line", "length", "answer", "nseries")}
    series_lengths: list[int] = []
    dropped = [Counter() for _ in sources]
    problems: list[str] = []
    tok = processor.tokenizer
    for s_id, src in enumerate(sources):
        pending: list[tuple] = []

        def flush():
            if not pending:
                return
            prompts = tok([p[2] for p in pending], add_special_tokens=False)["input_ids"]
            answers = tok([p[3] for p in pending], add_special_tokens=False)["input_ids"]
            for (off, lineno, _, _, lens), p_ids, a_ids in zip(pending, prompts, answers):
                n_rows = sum(processor.spec.num_patches(n) for n in lens)
                length = len(p_ids) - 2 * len(lens) + n_rows + len(a_ids)
                if length > cutoff_len:
                    dropped[s_id][OVER_CUTOFF] += 1
                    continue
                for k, v in zip(cols, (s_id, off, lineno, length, len(a_ids), len(lens))):
                    cols[k].append(v)
                series_lengths.extend(lens)
            pending.clear()

        with open(src.path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                here, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                parsed = parse_line(raw, src.columns, processor.spec)
                if isinstance(parsed, Rejected):
                    dropped[s_id][parsed.reason] += 1
                    problems.append(f"{src.path}:{lineno}: {parsed.reason}: {parsed.detail}")
                    continue
                text, answer, series = parsed
                prompt, _ = processor.rewrite(chat_prompt(text), series)
                pending.append((here, lineno, prompt, chat_answer(answer), [len(x) for x in series]))
                if len(pending) >= chunk:
                    flush()
            flush()
    if strict and problems:
        raise DataError(f"{len(problems)} bad samples (run without --strict_data to skip them)", problems)
    index = DataIndex(sources, np.array(cols["source"], np.int16), np.array(cols["offset"], np.int64),
                      np.array(cols["line"], np.int32), np.array(cols["length"], np.int32),
                      np.array(cols["answer"], np.int32), np.array(cols["nseries"], np.int16),
                      np.array(series_lengths, np.int32), dropped, problems, processor.spec)
    if len(index) == 0:
        raise DataError(f"no usable samples in {', '.join(s.path for s in sources)} "
                        f"(cutoff_len {cutoff_len}; dropped: {dict(sum(dropped, Counter()))})", problems)
    return index


def read_sample(index: DataIndex, i: int) -> tuple[str, str, list[np.ndarray]]:
    """(input, output, series) of indexed sample `i`, read from its line on disk."""
    src = index.sources[index.source[i]]
    with open(src.path, "rb") as f:
        f.seek(int(index.offset[i]))
        parsed = parse_line(f.readline(), src.columns, index.spec)
    if isinstance(parsed, Rejected):
        raise DataError(f"{src.path}:{index.line[i]}: the file changed since it was indexed; restart")
    return parsed


class SampleReader(torch.utils.data.Dataset):
    """Reads one indexed sample from disk on demand and encodes it."""

    def __init__(self, index: DataIndex, processor: ChatTSProcessor):
        self.index = index
        self.processor = processor

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Encoded:
        text, answer, series = read_sample(self.index, i)
        enc = self.processor.encode_chat(text, series, answer)
        if len(enc) != self.index.length[i]:
            src = self.index.sources[self.index.source[i]]
            raise DataError(f"{src.path}:{self.index.line[i]}: the file changed since it was indexed; restart")
        return enc


def split(index: DataIndex, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/eval split: `val_size` < 1 is a fraction, >= 1 a sample count."""
    order = np.random.default_rng(seed).permutation(len(index))
    n_val = int(val_size) if val_size >= 1 else int(round(val_size * len(index)))
    if n_val >= len(index):
        raise DataError(f"val_size {val_size} leaves no training samples out of {len(index)}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_order(index: DataIndex, ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The samples of one epoch, shuffled; a dataset of weight w appears w times (fractions drawn)."""
    rng = np.random.default_rng([seed, epoch])
    picked = []
    for s_id, src in enumerate(index.sources):
        mine = ids[index.source[ids] == s_id]
        whole, frac = int(src.weight), src.weight - int(src.weight)
        picked += [mine] * whole + [rng.choice(mine, int(round(frac * len(mine))), replace=False)]
    all_ids = np.concatenate(picked) if picked else ids[:0]
    return all_ids[rng.permutation(len(all_ids))]


def length_stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    return {"min": int(values.min()), "median": int(np.median(values)),
            "p95": int(np.percentile(values, 95)), "max": int(values.max())}


def describe(index: DataIndex) -> Iterator[dict]:
    """Per-dataset statistics for `inspect-data` and the start-of-run log."""
    series_end = np.cumsum(index.num_series)
    for s_id, src in enumerate(index.sources):
        rows = np.flatnonzero(index.source == s_id)
        lens = np.concatenate([index.series_lengths[series_end[r] - index.num_series[r]:series_end[r]]
                               for r in rows]) if len(rows) else np.zeros(0, np.int32)
        yield {"dataset": src.name, "kept": len(rows), "dropped": dict(index.dropped[s_id]),
               "series_per_sample": length_stats(index.num_series[rows]),
               "series_length": length_stats(lens), "seq_len": length_stats(index.length[rows]),
               "answer_tokens": length_stats(index.answer_tokens[rows])}
