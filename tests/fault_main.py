"""The training job's entry point (`chatts_train.training.loop.main`) with a fault injected on rank 1 only, at its
third micro-step: a CUDA out-of-memory error, or with FAULT=kill a SIGKILL of its own process (what the
kernel's out-of-memory killer does). Run by test_errors.py under DeepSpeed's launcher."""
import os
import signal
import sys

import torch
import torch.distributed as dist

from chatts_train.training.loop import main, micro_step


def oom_on_rank1(engine, batch, token_scale):
    if dist.get_rank() == 1 and engine.micro_steps == 2:
        if os.environ.get("FAULT") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.45 GiB (injected on rank 1 only)")
    return micro_step(engine, batch, token_scale)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:], step_fn=oom_on_rank1)
