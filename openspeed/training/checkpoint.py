"""Sharded, atomic, resumable checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout of ``<run_dir>/checkpoints/step_<N>/``: the DCP files for model and optimizer (any layout can
load them: DCP reshards), ``train_state.json`` (step, scheduler, data position, counters) and
``rng/rank<r>.pt``. A checkpoint is written under ``step_<N>.incomplete`` and renamed when every
rank has finished, so a directory named ``step_<N>`` is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from openspeed.errors import CheckpointError

# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), so the
# pieces of pipeline stages merge into one dict and any layout can load any other's checkpoint.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.json"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_complete(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, TRAIN_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    complete = list_complete(run_dir)
    return complete[-1][1] if complete else None


def save_checkpoint(
    path_root: str,
    step: int,
    parts: list[torch.nn.Module],
    optimizers: list[torch.optim.Optimizer | None],
    train_state: dict[str, Any],
    rng_state: dict[str, Any],
    keep_last: int | None = None,
) -> str:
    """Write step ``step`` atomically on all ranks; prune older ones after it is complete."""
    rank = dist.get_rank()
    final = os.path.join(path_root, f"step_{step}")
    tmp = final + ".incomplete"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    dist.barrier()
    model_sd, optim_sd, _ = _merged_state(parts, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state, os.path.join(tmp, "rng", f"rank{rank}.pt"))
    # Fault-injection point for the crash-during-save test: the shards are written, the
    # checkpoint is not yet complete.
    pause = float(os.environ.get("OPENSPEED_TEST_SAVE_PAUSE_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, TRAIN_STATE), "w", encoding="utf-8") as fh:
            json.dump({**train_state, "step": step, "world_size": dist.get_world_size()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for _, old in list_complete(os.path.dirname(path_root))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _merged_state(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer | None]):
    """One model dict and one optimizer dict over all parts, plus each part's own keys.

    ``optimizers[i]`` belongs to ``parts[i]``; it is ``None`` for a part without trainable
    parameters, which contributes model state only.
    """
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    keys = []
    for i, part in enumerate(parts):
        m, o = get_state_dict(part, optimizers[i] or [], options=_OPTIONS)
        model_sd.update(m)
        optim_sd.update(o)
        keys.append((list(m), list(o)))
    return model_sd, optim_sd, keys


def load_checkpoint(
    path: str, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer | None]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model and optimizer state in place; return (train_state, this rank's rng or None).

    Any layout loads any other's checkpoint: DCP reshards, and keys are parameter names.
    """
    state_file = os.path.join(path, TRAIN_STATE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"checkpoint {path} is incomplete or not a checkpoint (no {TRAIN_STATE})")
    with open(state_file, encoding="utf-8") as fh:
        train_state = json.load(fh)
    model_sd, optim_sd, keys = _merged_state(parts, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    for part, optimizer, (model_keys, optim_keys) in zip(parts, optimizers, keys, strict=True):
        set_state_dict(
            part,
            optimizer or [],
            model_state_dict={k: state["model"][k] for k in model_keys},
            optim_state_dict={k: state["optim"][k] for k in optim_keys},
            options=_OPTIONS,
        )
    rng = None
    rng_file = os.path.join(path, "rng", f"rank{dist.get_rank()}.pt")
    if train_state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=False)
    return train_state, rng
