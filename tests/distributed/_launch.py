"""Launch a function on several local processes joined by a gloo process group over loopback.

``run_ranks(fn, out_dir, world_size=2)`` starts ``world_size`` processes with
``torch.multiprocessing`` (fork where the platform has it, so the children inherit the
imported torch instead of importing it again, which takes seconds on a loaded machine; spawn
elsewhere). Each initialises ``torch.distributed`` with the gloo backend at
``MASTER_ADDR=127.0.0.1`` and a free port, then calls ``fn(rank, out_dir, *args)``. A failure
in any rank is re-raised here; a hang is killed after ``timeout`` seconds and reported.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str,
           args: tuple[Any, ...], init: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    torch.set_num_threads(1)
    if not init:  # fn starts the group itself (env://)
        try:
            fn(rank, out_dir, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, out_dir, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], out_dir: str, *args: Any, world_size: int = 2,
              timeout: float = 120.0, init: bool = True) -> None:
    """Run ``fn(rank, out_dir, *args)`` on ``world_size`` gloo ranks; raise on any failure.

    ``init=False``: ``fn`` calls ``init_process_group("gloo")`` itself (the environment
    holds ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE``, as torchrun sets).
    """
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), str(out_dir), args, init),
        nprocs=world_size,
        join=False, start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s (a collective hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
