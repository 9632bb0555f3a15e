"""Which process this is, for code that runs with or without a process group."""
from __future__ import annotations

import json
import os
import socket
from typing import Optional

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank0_print(*args) -> None:
    if rank() == 0:
        print(*args, flush=True)


# A rank killed outright (SIGKILL, e.g. by the kernel's out-of-memory killer) cannot report itself; its
# peers only see a closed connection. Each rank leaves its pid in OUTPUT/.ranks/ while it runs, so that a
# peer can name the rank whose process is gone without having signed out.
ROLL_CALL = ".ranks"


def sign_in(output_dir: str, rank: int) -> None:
    folder = os.path.join(output_dir, ROLL_CALL)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}, f)


def sign_out(output_dir: str, rank: int) -> None:
    folder = os.path.join(output_dir, ROLL_CALL)
    try:
        os.remove(os.path.join(folder, f"rank{rank}.json"))
        os.rmdir(folder)  # the last rank out leaves no folder behind
    except OSError:
        pass


def killed_ranks(output_dir: str) -> list[str]:
    """Ranks on this host that signed in and whose process is gone (or a zombie) without signing out."""
    folder, out = os.path.join(output_dir, ROLL_CALL), []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        try:
            with open(os.path.join(folder, name)) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if entry.get("host") == socket.gethostname() and not _alive(int(entry["pid"])):
            out.append(f"rank {entry['rank']} (pid {entry['pid']})")
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class LauncherWatch:
    """Under DeepSpeed's launcher (runner -> launch.py -> ranks) a supervisor that kills the runner's pid
    leaves launch.py and the ranks training. A rank tells by launch.py's parent changing (it is re-parented
    when the runner dies). Only under that launcher: a rank's grandparent elsewhere is a shell, whose exit
    (a closed terminal under nohup) must not stop the run."""

    def __init__(self):
        self.parent = os.getppid()
        try:
            with open(f"/proc/{self.parent}/cmdline", "rb") as f:
                under_deepspeed = b"deepspeed.launcher.launch" in f.read()
        except OSError:
            under_deepspeed = False
        self.runner = _parent_of(self.parent) if under_deepspeed else None

    def gone(self) -> bool:
        if self.runner is None:
            return False
        return os.getppid() != self.parent or _parent_of(self.parent) != self.runner
