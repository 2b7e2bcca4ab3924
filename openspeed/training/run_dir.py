"""A run directory holds one run: a fresh start never writes over, or prunes, an earlier run's files.

``train.resume=none`` (a fresh start) into a ``train.run_dir`` that already holds a run (checkpoints
or metrics) is refused with one line, unless ``train.overwrite=true``: then the old contents move to
``<run_dir>.previous`` first (an older ``.previous`` is deleted). A restart by torchrun's elastic
agent (``TORCHELASTIC_RESTART_COUNT > 0``) always resumes (``train.resume=auto``): the worker group
it restarts is the run that was interrupted.

Light on purpose (no torch): the command line checks before it starts any worker.
"""

from __future__ import annotations

import os
import shutil
import uuid

from openspeed.errors import ConfigError

PREVIOUS_SUFFIX = ".previous"


def restarted_by_agent() -> bool:
    """True in a worker group that torchrun's elastic agent restarted after a failure."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    except ValueError:
        return False


def effective_resume(cfg) -> str:
    """``train.resume`` as this process must apply it: ``auto`` in a restarted worker group."""
    resume = cfg.train.resume
    return "auto" if resume == "none" and restarted_by_agent() else resume


def run_contents(run_dir: str) -> list[str]:
    """What in ``run_dir`` belongs to a run that already trained: its checkpoints, its metrics."""
    found = []
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        found.append("checkpoints/")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    return found


def check_run_dir(cfg) -> None:
    """One-line :class:`ConfigError` when a fresh start would write into a run directory in use."""
    if effective_resume(cfg) != "none" or cfg.train.overwrite:
        return
    run_dir = cfg.train.run_dir
    found = run_contents(run_dir)
    if found:
        raise ConfigError(
            f"train.run_dir={run_dir} already holds a run ({', '.join(found)}); continue it with "
            f"train.resume=auto, or start over with train.overwrite=true (the old run moves to "
            f"{run_dir.rstrip(os.sep)}{PREVIOUS_SUFFIX})"
        )


def prepare_run_dir(cfg) -> str | None:
    """Before a fresh start with ``train.overwrite=true``: move a used run directory aside.

    Returns where the old run went (``None`` when there was none to move). Rank 0 only.
    """
    check_run_dir(cfg)
    run_dir = cfg.train.run_dir.rstrip(os.sep)
    if effective_resume(cfg) != "none" or not run_contents(run_dir):
        return None
    previous = run_dir + PREVIOUS_SUFFIX
    try:
        if os.path.exists(previous):
            shutil.rmtree(previous)
        os.replace(run_dir, previous)
    except OSError as exc:
        raise ConfigError(f"train.overwrite=true: cannot move {run_dir} to {previous}: {exc.strerror or exc}") from None
    return previous


def new_run_id() -> str:
    """A fresh run's id: recorded in each of its checkpoints, so pruning touches only its own."""
    return uuid.uuid4().hex[:16]
