"""Embedding lookup and answer cross-entropy straight from each rank's ZeRO-3 slice of the vocabulary matrices.

Under ZeRO-3 a forward through `embed_tokens` or `lm_head` all-gathers the whole [152064 x 5120] matrix,
1.45 GiB each on every GPU (the request seen in the OOM messages at 4,096 tokens), for a step that needs the
rows of its own tokens and logits at a few hundred answer positions. Here each rank works on its own slice
of the flattened weight (`param.ds_tensor`; layout in weights.py) and only activations travel: token ids and
the looked-up rows (world x tokens x hidden), the answer hidden states, and per-row softmax statistics.

Both matrices are frozen under LoRA, so no weight gradient is formed. A row cut by a slice boundary
("shared" row) is split between two ranks: its logit is the sum of their partial dot products.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..tokens import IGNORE_INDEX
from .weights import partition_range

_CHUNK_ELEMENTS = 1 << 26  # fp32 logits per vocabulary chunk (256 MB), bounding the transient memory


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """`module.weight` without ZeRO-3's attribute hook: read as `module.weight` inside a forward, DeepSpeed
    registers the parameter as used by the running module and gathers it whole on every step after."""
    return dict.__getitem__(module._parameters, "weight")


def partitioned(weight: torch.Tensor) -> bool:
    """True when `weight` is a ZeRO-3 partitioned parameter whose slice holds plain values in memory (not
    ZeRO++ quantized non-trainable weights, not swapped out to NVMe: those need DeepSpeed's own gather)."""
    part = getattr(weight, "ds_tensor", None)
    return (part is not None and part.numel() > 0 and not hasattr(part, "ds_quant_scale")
            and getattr(part, "final_location", None) is None)


@dataclass(frozen=True)
class Slice:
    """Which elements of a [rows x width] weight this rank holds: flat [start, stop) of the unpadded tensor."""

    start: int
    stop: int
    width: int
    rank: int
    world: int
    shared: tuple[int, ...]  # rows cut by some rank boundary, the same on every rank

    @property
    def first_row(self) -> int:  # first row held whole
        return -(-self.start // self.width)

    @property
    def end_row(self) -> int:  # one past the last row held whole
        return max(self.stop // self.width, self.first_row)

    def whole_rows(self, part: torch.Tensor) -> torch.Tensor:
        off = self.first_row * self.width - self.start
        return part[off: off + (self.end_row - self.first_row) * self.width].view(-1, self.width)

    def pieces(self) -> list[tuple[int, int, int, int]]:
        """(index into `shared`, first column, end column, offset in the slice) of the shared rows held here."""
        out = []
        for j, row in enumerate(self.shared):
            lo, hi = max(self.start, row * self.width), min(self.stop, (row + 1) * self.width)
            if lo < hi:
                out.append((j, lo - row * self.width, hi - row * self.width, lo - self.start))
        return out


def local_slice(weight: torch.Tensor, device: torch.device) -> tuple[Slice, torch.Tensor]:
    """This rank's layout and its slice of `weight` on `device` (a copy only under parameter offload)."""
    group = weight.ds_process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    size, numel, width = weight.ds_tensor.ds_numel, weight.ds_numel, weight.ds_shape[-1]
    start, stop = partition_range(weight)
    cuts = (k * size for k in range(1, world) if k * size < numel)
    shared = tuple(sorted({c // width for c in cuts if c % width}))
    part = weight.ds_tensor.narrow(0, 0, stop - start).to(device, non_blocking=True)
    return Slice(start, stop, width, rank, world, shared), part


@functools.cache
def _host_world_group():
    """A gloo group of every rank, for values the host needs from all of them (made by all ranks at once); under
    an emulated world (torch's fake process group, engine.init_process) the world group itself, on the host too."""
    return dist.group.WORLD if dist.get_backend() == "fake" else dist.new_group(backend="gloo")


def _most_rows(n: int, group) -> int:
    """The largest of every rank's `n`, exchanged on the host: read back from the GPU it would make the host
    wait for the GPU's whole queue in the middle of the forward. Over the world group a gloo group made once,
    by every rank at its first call (all ranks reach it together: the forward is collective anyway). DeepSpeed's
    data-parallel group is a copy of the world group, so "every rank" is what its size says."""
    on_host = ("gloo", "fake")
    if dist.get_backend(group) not in on_host and dist.get_world_size(group) == dist.get_world_size():
        group = _host_world_group()
    if dist.get_backend(group) not in on_host:  # a subgroup on the GPUs: exchanged there, with the wait
        t = torch.tensor([n], device=torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())
    t = torch.tensor([n])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.numpy()[0])  # a host tensor's value, read without dispatching a device read


def _gather_rows(x: torch.Tensor, group, fill, most: int) -> torch.Tensor:
    """All ranks' `x` (rows of different counts, at most `most`) stacked as [world * most, ...]."""
    padded = x.new_full((most, *x.shape[1:]), fill)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def embedding_lookup(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`weight[ids]` for a ZeRO-3 partitioned [vocab x hidden] weight, without gathering it. Collective:
    every rank of the weight's group calls it, each with its own ids."""
    group = weight.ds_process_group
    s, part = local_slice(weight, ids.device)
    n = ids.numel()
    most = _most_rows(n, group)
    every = _gather_rows(ids.reshape(-1), group, -1, most)
    whole = s.whole_rows(part)
    out = part.new_zeros(len(every), s.width)
    if len(whole):
        # ids held elsewhere (and the padding's -1) pick some row here and are zeroed: a masked pick, not a
        # boolean index, whose size the host would have to wait for
        hit = (every >= s.first_row) & (every < s.end_row)
        out = torch.where(hit[:, None], whole[(every - s.first_row).clamp(0, len(whole) - 1)], out)
    for j, lo, hi, off in s.pieces():
        out[:, lo:hi] = torch.where((every == s.shared[j])[:, None], part[off: off + hi - lo], out[:, lo:hi])
    dist.all_reduce(out, group=group)  # every element is held by exactly one rank: the sum is exact
    return out.view(s.world, most, s.width)[s.rank, :n].reshape(*ids.shape, s.width)


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, reduction="sum")` for a ZeRO-3 partitioned [vocab x hidden]
    weight, without gathering it; differentiable in `hidden`. Collective, like `embedding_lookup`."""
    return _CrossEntropySum.apply(hidden, targets, weight)


def _chunks(s: Slice, part: torch.Tensor, rows: int):
    """(first row, end row, those whole rows of the slice) in blocks of at most _CHUNK_ELEMENTS logits."""
    step = max(1024, _CHUNK_ELEMENTS // max(rows, 1))
    for c0 in range(s.first_row, s.end_row, step):
        c1 = min(c0 + step, s.end_row)
        yield c0, c1, s.whole_rows(part)[c0 - s.first_row: c1 - s.first_row]


def _shared_logits(x: torch.Tensor, s: Slice, part: torch.Tensor, group) -> torch.Tensor:
    """Full logits of the shared rows: each rank's partial dot products, summed over ranks."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = x.new_zeros(x.shape[0], len(s.shared), dtype=acc)
    for j, lo, hi, off in s.pieces():
        out[:, j] = x[:, lo:hi].to(acc) @ part[off: off + hi - lo].to(acc)
    if len(s.shared):
        dist.all_reduce(out, group=group)
    return out


def _in_chunk(ts: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which targets fall in vocabulary rows [c0, c1), and their column there (clamped in range for the rest)."""
    return (ts >= c0) & (ts < c1), (ts - c0).clamp(0, c1 - c0 - 1)


class _CrossEntropySum(torch.autograd.Function):
    """Vocabulary-parallel softmax cross-entropy. Forward: each rank the logits of its rows of the vocabulary
    for every rank's answer positions, combined through a max and a sum per position; the shared rows count
    on rank 0 only. Backward recomputes the logits chunk by chunk rather than keeping [positions x vocab/world]."""

    @staticmethod
    def forward(ctx, x, targets, weight):
        group = weight.ds_process_group
        s, part = local_slice(weight, x.device)
        n = x.shape[0]
        most = _most_rows(n, group)
        xs = _gather_rows(x.detach(), group, 0, most)
        ts = _gather_rows(targets, group, IGNORE_INDEX, most)
        shared = _shared_logits(xs, s, part, group)
        acc = shared.dtype
        m = torch.full((len(xs),), float("-inf"), dtype=acc, device=x.device)
        total = torch.zeros(len(xs), dtype=acc, device=x.device)
        target_logit = torch.zeros(len(xs), dtype=acc, device=x.device)
        for c0, c1, w in _chunks(s, part, len(xs)):
            logits = (xs @ w.T).to(acc)
            new_m = torch.maximum(m, logits.max(1).values)
            total = total * torch.exp(m - new_m) + torch.exp(logits - new_m[:, None]).sum(1)
            m = new_m
            inside, col = _in_chunk(ts, c0, c1)
            target_logit += torch.where(inside, logits.gather(1, col[:, None])[:, 0], 0.0)
        if s.rank == 0 and len(s.shared):
            new_m = torch.maximum(m, shared.max(1).values)
            total = total * torch.exp(m - new_m) + torch.exp(shared - new_m[:, None]).sum(1)
            m = new_m
            for j, row in enumerate(s.shared):
                target_logit += torch.where(ts == row, shared[:, j], 0.0)
        top = m.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        total = total * torch.exp(m - top)
        dist.all_reduce(total, group=group)
        dist.all_reduce(target_logit, group=group)
        lse = top + torch.log(total)
        mine = slice(s.rank * most, s.rank * most + n)
        loss = torch.where(ts[mine] != IGNORE_INDEX, lse[mine] - target_logit[mine], 0.0).sum()
        ctx.save_for_backward(xs, ts, lse, shared)
        ctx.weight, ctx.n, ctx.most, ctx.dtype = weight, n, most, x.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        xs, ts, lse, shared = ctx.saved_tensors
        weight = ctx.weight
        group = weight.ds_process_group
        s, part = local_slice(weight, xs.device)
        # d(loss of rank r)/d(logit) = g_r (softmax - one-hot) on rank r's positions: every rank needs every g_r
        acc = lse.dtype
        gs = [torch.zeros(1, dtype=acc, device=xs.device) for _ in range(s.world)]
        dist.all_gather(gs, grad.reshape(1).to(acc).contiguous(), group=group)
        g = torch.cat(gs).repeat_interleave(ctx.most) * (ts != IGNORE_INDEX)
        gx = torch.zeros(xs.shape, dtype=acc, device=xs.device)
        for c0, c1, w in _chunks(s, part, len(xs)):
            p = torch.exp((xs @ w.T).to(acc) - lse[:, None])
            inside, col = _in_chunk(ts, c0, c1)
            p.scatter_add_(1, col[:, None], -inside[:, None].to(acc))  # softmax - one-hot
            gx += ((p * g[:, None]).to(xs.dtype) @ w).to(acc)
        if len(s.shared):
            d = torch.exp(shared - lse[:, None]) - torch.stack([ts == row for row in s.shared], 1).to(lse.dtype)
            d = d * g[:, None]
            for j, lo, hi, off in s.pieces():
                gx[:, lo:hi] += d[:, j:j + 1] * part[off: off + hi - lo].to(acc)
        dist.all_reduce(gx, group=group)
        mine = gx.view(s.world, ctx.most, -1)[s.rank, :ctx.n]
        return mine.to(ctx.dtype), None, None


class SlicedVocabulary:
    """What the model calls to read its vocabulary matrices (model/modeling.py's `vocabulary`): a partitioned
    weight from each rank's slice, through the functions above. The loader of a DeepSpeed run sets it."""

    @staticmethod
    def partitioned_weight(module: torch.nn.Module) -> Optional[torch.Tensor]:
        """The module's weight if it is a ZeRO-3 partition, else None (whole: read as usual)."""
        weight = weight_of(module)
        return weight if partitioned(weight) else None

    lookup = staticmethod(embedding_lookup)
    cross_entropy_sum = staticmethod(cross_entropy_sum)
