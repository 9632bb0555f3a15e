"""Checkpoint weights straight into ZeRO-3 partitions.

transformers' ZeRO-3 loader reads every safetensors shard whole into RAM on *every* rank (about 5 GB at a
time for ChatTS-14B), then gathers each layer and lets rank 0 fill it. With parameter offload that stacked
on top of the pinned partitions: 25-31 GB RSS per rank for a 29.5 GB model on 2 GPUs, where the pinned
shard is 14.8 GB. Here each rank reads only the rows of its own partition of each tensor, through the
memory-mapped file, and copies them into `param.ds_tensor`: no rank holds more than one tensor's slice at a
time, and no weight crosses the network.

ZeRO-3's layout (deepspeed/runtime/zero/partition_parameters.py `_partition_param`): the flattened tensor,
padded to `partition_numel * world`, split in equal consecutive pieces; rank r holds
`flat[r * partition_numel : (r + 1) * partition_numel]`.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..model.shards import open_shard, weight_map

def _flat_range(tensor_slice, shape: list[int], start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor, reading only the rows that hold them."""
    row = 1
    for d in shape[1:]:
        row *= d
    if not shape:
        return tensor_slice[...].reshape(-1)[start:stop]
    r0, r1 = start // row, -(-stop // row)
    rows = tensor_slice[r0:r1].reshape(-1)
    return rows[start - r0 * row: stop - r0 * row]


def partition_range(p: torch.nn.Parameter, secondary: bool = False) -> tuple[int, int]:
    """Flat [start, stop) of the unpadded tensor that this rank's ZeRO-3 partition of `p` holds (layout above);
    `secondary`: of its hpZ copy, partitioned the same way over the ranks of its node."""
    if secondary:
        size, group = p.ds_secondary_tensor.ds_numel, p.ds_zero_param_process_group
    else:
        size, group = p.ds_tensor.ds_numel, p.ds_process_group
    start = min(size * dist.get_rank(group=group), p.ds_numel)
    return start, min(start + size, p.ds_numel)


def partitions_of(p: torch.nn.Parameter) -> list[tuple[torch.Tensor, int, int]]:
    """(tensor, start, stop) of each ZeRO-3 partition this rank holds of `p`: its own, and with hpZ (several
    nodes) the copy inside its node, which zero.Init fills from the whole tensor at partitioning time, before
    any value is loaded here (left unfilled, hpZ trained on NaNs)."""
    out = [(p.ds_tensor, *partition_range(p))]
    if getattr(p, "ds_secondary_tensor", None) is not None:
        out.append((p.ds_secondary_tensor, *partition_range(p, secondary=True)))
    return out


def _checked_params(model: torch.nn.Module, path: str) -> tuple[dict, dict]:
    files = weight_map(path)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in files]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} weights the model needs, e.g. "
                              f"{', '.join(missing[:3])}; is it a ChatTS checkpoint of this release?")
    return files, params


def _check_shape(path: str, name: str, key: str, shape, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{os.path.join(path, name)}: `{key}` has shape {tuple(shape)}, the model "
                              f"expects {tuple(expected)} (config.json and weights disagree)")


def load_whole(model: torch.nn.Module, path: str) -> None:
    """Fill every parameter of an unpartitioned `model` from the checkpoint folder, where the parameter lives
    (the GPU): tensor by tensor from the memory-mapped shards, converted to the parameter's dtype."""
    files, params = _checked_params(model, path)
    for name in sorted(set(files[n] for n in params)):
        with open_shard(path, name) as f:
            for key in (n for n in params if files[n] == name):
                t = f.get_tensor(key)
                _check_shape(path, name, key, t.shape, params[key].shape)
                with torch.no_grad():
                    params[key].copy_(t)


def load_into_partitions(model: torch.nn.Module, path: str) -> None:
    """Fill every ZeRO-3 partitioned parameter of `model` from the checkpoint folder `path`. All ranks call
    it; each reads only its own part. Names must match the checkpoint's keys exactly."""
    files, params = _checked_params(model, path)
    for name in sorted(set(files[n] for n in params)):
        with open_shard(path, name) as f:
            for key in (n for n in params if files[n] == name):
                p = params[key]
                shape = list(f.get_slice(key).get_shape())
                _check_shape(path, name, key, shape, p.ds_shape)
                for part, start, stop in partitions_of(p):
                    size = part.ds_numel
                    with torch.no_grad():
                        if start < stop:
                            part.narrow(0, 0, stop - start).copy_(_flat_range(f.get_slice(key), shape, start, stop))
                        if stop - start < size:  # the padding of the last rank
                            part.narrow(0, stop - start, size - (stop - start)).zero_()
