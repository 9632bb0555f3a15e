"""The run folder as the record of a run (`run.json`): the resolved configuration and DeepSpeed dict, the
world size, the held-out samples and the data files as they were. `--resume` checks against it, and
`chatts-train eval --run DIR` takes its split from it instead of asking for data, cutoff, val_size and seed.
Training writes it and checks a resume against it (train/run.py); using the result reads it."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import numpy as np

from ..data.indexing import DataIndex
from ..errors import CheckpointError, read_json_object

RECORD = "run.json"


def sample_names(index: DataIndex, ids: np.ndarray) -> list[str]:
    """`file:line` of each sample: stable across re-indexing, readable by a person."""
    return [f"{index.sources[index.source[i]].path}:{index.line[i]}" for i in ids]


def data_files(index: DataIndex) -> dict[str, dict]:
    return {s.path: {"bytes": os.path.getsize(s.path), "mtime": os.path.getmtime(s.path)} for s in index.sources}


def write_run_record(cfg, ds: dict, world: int, index: DataIndex, val_ids: np.ndarray, plan: dict) -> str:
    """run.json in `cfg.output_dir` (`cfg`: the run's TrainConfig, recorded whole)."""
    path = os.path.join(cfg.output_dir, RECORD)
    record = {"train": asdict(cfg), "plan": plan, "deepspeed": ds, "world_size": world, "data_files": data_files(index),
              "samples": len(index), "held_out": sample_names(index, val_ids),
              "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def read_run_record(run_dir: str) -> dict:
    return read_json_object(os.path.join(run_dir, RECORD), CheckpointError, f"{run_dir}: no {RECORD}; point --run at "
                            f"an output folder of chatts-train training",
                            "the run's record is damaged: pass --model, --data and --val_size instead")


def held_out_ids(record: dict, index: DataIndex) -> np.ndarray:
    """The recorded held-out samples in a fresh index of the same data."""
    position = {name: i for i, name in enumerate(sample_names(index, np.arange(len(index))))}
    missing = [n for n in record["held_out"] if n not in position]
    if missing:
        raise CheckpointError(f"{len(missing)} held-out samples of the run are not in the data any more (e.g. "
                              f"{missing[0]}): the data changed since training")
    return np.array(sorted(position[n] for n in record["held_out"]), dtype=np.int64)
