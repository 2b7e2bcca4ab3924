"""Run a test function in several gloo CPU processes (``torch.multiprocessing.spawn``), one thread each.

``run_workers(fn, world, out_dir)`` calls ``fn(rank, out_dir)`` in ``world`` fresh processes that share
one process group; a worker's traceback is printed and fails the spawn. Workers report back through
files in ``out_dir``.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch


def _entry(rank: int, world: int, port: int, fn, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, out_dir)
        # Every rank done before any tears the group down: a rank destroying it while a peer's gloo
        # threads still talk to it can abort that peer ("terminate called without an active exception").
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, out_dir: str) -> None:
    """``fn(rank, out_dir)`` on ``world`` gloo ranks (``fn`` must be a module-level function)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, str(out_dir)), nprocs=world, join=True)
