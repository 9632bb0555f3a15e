"""Qwen2's MLP gate and RMSNorms with hand-written backward passes that keep less for backward.

With gradient checkpointing, a decoder layer's activations exist once per backward step, recomputed; their size
is the backward's peak above the weights. Autograd keeps, per layer at 4,096 tokens on the 14B shape: each
RMSNorm's fp32 copy of its input (80 MiB, twice) and, for `silu(gate) * up`, `gate`, `silu(gate)` and `up`
(108 MiB each). These functions keep the fp16 input of a norm (often alive anyway: the layer's input) and
`gate`, `up`, and recompute the rest in backward. Forward and backward run the same operations in the same
order as transformers' modules under autograd, so results are bit-identical (tests/test_model.py).

On CUDA GPUs with Triton the same arithmetic is compiled into one kernel per function (`fused_kernels`,
compiled before the model is loaded by `compile_ahead`): fewer passes over memory and no fp32 temporaries,
results equal up to the intermediate fp16 roundings the fused kernels skip.
"""
from __future__ import annotations

import functools
import importlib.util
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _gate_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _gate_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _norm_forward_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _norm_backward_kernel(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> torch.Tensor:
    # autograd's chain for the forward above, op by op: mul, cast, mul by rstd, rsqrt, mean, pow
    x32 = x.to(torch.float32)
    g32 = (grad * weight).to(torch.float32)
    grad_rstd = (g32 * x32).sum(-1, keepdim=True)
    grad_var = -0.5 * grad_rstd * rstd.pow(3)
    grad_x32 = g32 * rstd + grad_var.expand_as(x32) / x32.shape[-1] * (2 * x32)
    return grad_x32.to(x.dtype)


@dataclass(frozen=True)
class Kernels:
    """The arithmetic of SiluGate and RMSNormFunction (below); `EAGER` runs it op by op, `fused_kernels()`
    the same Python compiled into one kernel per function."""
    gate_forward: Callable
    gate_backward: Callable
    norm_forward: Callable
    norm_backward: Callable


EAGER = Kernels(_gate_forward, _gate_backward, _norm_forward_kernel, _norm_backward_kernel)


@functools.cache
def fused_kernels() -> Kernels:
    """EAGER's functions through torch.compile (compiled at first call: `compile_ahead` makes that call). Op
    by op, the norm's backward alone reads or writes ~1.9 GB per 14B layer at 4,096 tokens in a dozen kernels,
    with fp32 temporaries of 80 MiB each; compiled it is one kernel that reads `grad` and `x` and writes the
    result. Rounding differs from EAGER's by intermediate fp16 roundings that the fused kernels skip."""
    return Kernels(*(torch.compile(f, fullgraph=True) for f in
                     (_gate_forward, _gate_backward, _norm_forward_kernel, _norm_backward_kernel)))


def fusing_unavailable() -> Optional[str]:
    """Why fused kernels can't run in this process, or None: they are compiled with Triton, for CUDA GPUs."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        return f"the accelerator is {get_accelerator().device_name()}, fused kernels are compiled for CUDA"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (it comes with PyTorch's Linux CUDA wheels: pip install triton)"
    return None


def compile_ahead(kernels: Kernels, hidden: int, intermediate: int, eps: float, length: int, dtype: torch.dtype,
                  device: torch.device) -> None:
    """Compile the kernels for every sequence length, tuned at `length`, before the model is on the GPU.
    Compiled at the first step instead, Triton's trial runs of candidate configurations come on top of that
    step's memory (the loop's first step, compiling, reserved 1.7 GiB more than memprobe with the compile
    cache warm, on 2 x H200), and the second length seen compiles them all again."""
    def dynamic(*shape: int, requires_grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, dtype=dtype, device=device)
        torch._dynamo.mark_dynamic(t, 0)  # one graph for every number of positions (1 and 0 aside)
        return t.requires_grad_(requires_grad)

    # Graphs are kept apart by the inputs' requires_grad (torch.compile's guards): a layer's forward runs
    # once without autograd (the checkpointed pass: False) and once recomputed under it (True); backward
    # gets the saved inputs (True) and a gradient (False). Norm weights are frozen Parameters under LoRA.
    weight = torch.nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
    with torch.no_grad():
        for requires_grad in (False, True):
            x = dynamic(length, hidden, requires_grad=requires_grad)
            _, rstd = kernels.norm_forward(x, weight, eps)
            gate, up = (dynamic(length, intermediate, requires_grad=requires_grad) for _ in range(2))
            kernels.gate_forward(gate, up)
        torch._dynamo.mark_dynamic(rstd, 0)
        kernels.norm_backward(dynamic(length, hidden), x, weight, rstd)
        kernels.gate_backward(dynamic(length, intermediate), gate, up)


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., features] as [positions, features]: kernels then see one layout whatever the batch shape or the
    stride of a batch dimension of 1 (torch.compile guards on both)."""
    return t.reshape(-1, t.shape[-1])


class SiluGate(torch.autograd.Function):
    """`silu(gate) * up`, keeping `gate` and `up` only (not `silu(gate)`)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        ctx.shape = gate.shape
        gate, up = rows(gate), rows(up)
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        return kernels.gate_forward(gate, up).view(ctx.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.kernels.gate_backward(rows(grad), gate, up)
        return grad_gate.view(ctx.shape), grad_up.view(ctx.shape), None


class RMSNormFunction(torch.autograd.Function):
    """Qwen2RMSNorm: `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`, keeping the input in its own
    dtype and the per-row rsqrt instead of the fp32 copy of the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: Kernels) -> torch.Tensor:
        ctx.shape = x.shape
        x = rows(x)
        y, rstd = kernels.norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.kernels = kernels
        return y.view(ctx.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a trained norm (not under LoRA): eager, rare
            grad_weight = (rows(grad) * (x.to(torch.float32) * rstd).to(x.dtype)).sum_to_size(weight.shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.kernels.norm_backward(rows(grad), x, weight, rstd).view(ctx.shape)
        return grad_x, grad_weight, None, None


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluGate.apply(self.gate_proj(x), self.up_proj(x), self.lean_kernels))


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(x, self.weight, self.variance_epsilon, self.lean_kernels)


def keep_fewer_activations(model: torch.nn.Module, kernels: Kernels = EAGER) -> int:
    """Route the decoder's SiLU-gated MLPs and RMSNorms through the functions above, computed by `kernels`
    (modules keep their hooks: ZeRO-3 still gathers their weights). Returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Qwen2MLP" and type(module.act_fn).__name__ == "SiLUActivation":
            module.forward = types.MethodType(_mlp_forward, module)
        elif kind == "Qwen2RMSNorm":
            module.forward = types.MethodType(_norm_forward, module)
        else:
            continue
        module.lean_kernels = kernels
        changed += 1
    return changed


def lean_modules(model: torch.nn.Module, kernels: Optional[Kernels] = None) -> int:
    """How many modules run through the functions above (with `kernels`, through those kernels)."""
    lean = (_mlp_forward, _norm_forward)
    return sum(getattr(getattr(m, "forward", None), "__func__", None) in lean
               and (kernels is None or m.lean_kernels is kernels) for m in model.modules())
