"""Which process this is, for code that runs with or without a process group."""
from __future__ import annotations

import json
import os
import socket

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
