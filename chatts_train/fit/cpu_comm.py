"""A workaround for DeepSpeed's ZeRO-3 all-gathers on the CPU accelerator (gloo): the tests' and the demo's
backend. Set-up calls it visibly; on GPUs it does nothing."""
from __future__ import annotations


class _Completed:
    """Handle of a collective that already finished."""

    def wait(self) -> None:
        pass


def blocking_gathers_on_cpu() -> None:
    """DeepSpeed 0.18 launches several async all-gathers and waits only for the last one ("ordered on the
    CUDA stream"). With gloo on the CPU accelerator they are not ordered, and ZeRO-3 then reads half-gathered
    weights: seen here as NaN or random weights after loading and run-to-run different losses. On the CPU
    we make those gathers blocking; GPUs are left alone."""
    import deepspeed.comm as dcomm
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or getattr(dcomm, "_chatts_blocking", False):
        return
    for name in ("all_gather", "all_gather_into_tensor"):
        original = getattr(dcomm, name)

        def blocking(*args, _original=original, async_op=False, **kwargs):
            handle = _original(*args, async_op=False, **kwargs)
            return (handle or _Completed()) if async_op else handle

        setattr(dcomm, name, blocking)
    dcomm._chatts_blocking = True
