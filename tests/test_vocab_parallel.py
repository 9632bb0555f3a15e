"""vocab_parallel.py against plain indexing and F.cross_entropy, on 3 gloo processes holding ZeRO-3-style
slices of a weight whose slice boundaries cut rows (the shared-row path) and one rank with no answers."""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from host_waits import HostWaits

WORLD, VOCAB, WIDTH = 3, 37, 8


def zero3_weight(full: torch.Tensor, rank: int, world: int) -> SimpleNamespace:
    """What ZeRO-3 leaves on a rank: the flat tensor padded to world x size, this rank's piece."""
    size = -(-full.numel() // world)
    flat = torch.cat([full.reshape(-1), full.new_zeros(size * world - full.numel())])
    part = flat[rank * size:(rank + 1) * size].clone()
    part.ds_numel = size
    return SimpleNamespace(ds_tensor=part, ds_numel=full.numel(), ds_shape=full.shape, ds_process_group=dist.group.WORLD)


def worker(rank: int, port: int, results) -> None:
    from chatts_train.fit import vocab_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    full = torch.randn(VOCAB, WIDTH, dtype=torch.float64)  # the same on every rank
    weight = zero3_weight(full, rank, WORLD)
    torch.manual_seed(1 + rank)
    ids = torch.randint(0, VOCAB, (2, 5 + rank))
    n = [6, 0, 4][rank]  # rank 1 has no answer positions this step
    x = torch.randn(n, WIDTH, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (n,))
    if n:
        targets[0] = vocab_parallel.local_slice(weight, x.device)[0].shared[0]  # a target in a shared row
        targets[-1] = -100
    with HostWaits() as waits:  # none: the host can queue the whole step without waiting for the GPU
        got = vocab_parallel.embedding_lookup(weight, ids)
        loss = vocab_parallel.cross_entropy_sum(x, weight, targets)
        (loss * (rank + 1)).backward()  # a different upstream gradient on each rank
    ref_x = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_x @ full.T, targets, reduction="sum")
    (ref * (rank + 1)).backward()
    results[rank] = {
        "shared": vocab_parallel.local_slice(weight, x.device)[0].shared,
        "lookup_err": float((got - full[ids]).abs().max()),
        "loss": float(loss), "ref": float(ref),
        "grad_err": float((x.grad - ref_x.grad).abs().max()) if n else 0.0,
        "grad_norm": float(ref_x.grad.norm()) if n else 0.0,
        "host_waits": waits.seen,
    }
    dist.destroy_process_group()


def test_slices_give_the_lookup_loss_and_gradient_of_the_whole_matrix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, results), nprocs=WORLD)
    assert results[0]["shared"], "the test must cut rows between ranks"
    for r in range(WORLD):
        got = results[r]
        assert got["lookup_err"] == 0.0
        assert abs(got["loss"] - got["ref"]) < 1e-9 * max(1.0, abs(got["ref"]))
        assert got["grad_err"] < 1e-9
        assert got["host_waits"] == []
    assert results[1]["loss"] == 0.0 and results[0]["grad_norm"] > 0
