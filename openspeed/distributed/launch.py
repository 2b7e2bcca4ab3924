"""Start N local worker processes under torch's elastic launcher (what ``torchrun`` uses).

Running the launcher in-process lets the CLI turn a worker's failure into one line instead of
torchrun's multi-screen report.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(nproc: int, command: list[str], extra_env: dict[str, str]) -> int:
    """Run ``command`` (an executable plus arguments) as ``nproc`` ranks; return the worst exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The elastic agent's loggers set their own level (LOGLEVEL, default WARNING), so quieting
    # "torch.distributed" leaves them on: a failed worker would add the agent's "failed (exitcode...)"
    # line to the one line the caller prints.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # Each worker gets an equal share of the cores; oversubscription slows steps down ~40x.
    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.update(extra_env)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"openspeed-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=command[0])(*command[1:])
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return max(codes, key=abs) if codes else 1
    return 0
