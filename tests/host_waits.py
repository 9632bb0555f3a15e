"""A dispatch mode that records what makes the host wait for the GPU: a size known only after a search
(`nonzero`, a boolean index, `masked_select`) and a value read (`.item()`, `bool(tensor)`)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

WAITS = (torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten._local_scalar_dense.default)


class HostWaits(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if boolean_index or func in WAITS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
