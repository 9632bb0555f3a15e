"""A checkpoint folder's weight files (safetensors, single-file or sharded with an index): which tensor is in
which shard, what is missing or truncated, how big they are. Read by the model, by loading and by merging."""
from __future__ import annotations

import json
import os

from ..errors import CheckpointError, read_json_object

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_map(path: str) -> dict[str, str]:
    """{tensor name: shard file name} of a checkpoint folder, single-file or sharded."""
    index_file = os.path.join(path, INDEX)
    if os.path.isfile(index_file):
        index = read_json_object(index_file, CheckpointError, f"{index_file}: missing", "download it again")
        try:
            return dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file} is not a valid safetensors index ({e}); download it again") from None
    if os.path.isfile(os.path.join(path, SINGLE)):
        with open_shard(path, SINGLE) as f:
            return {k: SINGLE for k in f.keys()}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}")


def missing_shards(path: str) -> list[str]:
    """The shard files the index names that are not in the folder."""
    return [s for s in sorted(set(weight_map(path).values())) if not os.path.isfile(os.path.join(path, s))]


def checkpoint_bytes(path: str) -> int:
    """Size of the weights on disk (the shard files; their headers are a few KB)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in set(weight_map(path).values()))


def largest_shard_bytes(path: str) -> int:
    return max(os.path.getsize(os.path.join(path, f)) for f in set(weight_map(path).values()))


def check_shard(path: str, name: str) -> None:
    """A shard whose header is readable and whose size matches it (a truncated download fails here)."""
    file = os.path.join(path, name)
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(header_len)) if 0 < header_len < 100_000_000 else None
        except ValueError:
            header = None
    ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"]
    if header is None or os.path.getsize(file) != 8 + header_len + max(ends, default=0):
        raise CheckpointError(f"{file} is corrupt or truncated; download it again")


def open_shard(path: str, name: str):
    from safetensors import safe_open

    file = os.path.join(path, name)
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for truncated or corrupt files
        raise CheckpointError(f"{file} is corrupt or truncated ({e}); download it again") from None
