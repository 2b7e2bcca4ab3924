"""Sharded, atomic, resumable checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout of ``<run_dir>/checkpoints/step_<N>/``: the DCP files for model and optimizer (any layout can
load them: DCP reshards), ``train_state.json`` (step, scheduler, data position, counters, the run's
id) and ``rng/rank<r>.json`` (every random generator's state as numbers). A checkpoint is written
under ``step_<N>.incomplete`` and renamed when every rank has finished, so a directory named
``step_<N>`` is always complete. Re-saving a step that exists first renames the old one to
``step_<N>.replaced``, which counts as complete until the new one is in place: at no moment is
there no complete checkpoint of the step.

No file of ours holds a pickle; DCP's own ``.metadata`` file is one (torch unpickles it on load),
so a checkpoint is trusted input.
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

from openspeed.distributed import comm
from openspeed.errors import CheckpointError

# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), so the
# pieces of pipeline stages merge into one dict and any layout can load any other's checkpoint.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
STEP_DIR = re.compile(r"^step_(\d+)$")
REPLACED_DIR = re.compile(r"^step_(\d+)\.replaced$")
TRAIN_STATE = "train_state.json"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_complete(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first.

    A ``step_<N>.replaced`` directory stands in for ``step_<N>`` while a re-save of the step swaps
    the two (or after a crash between the renames).
    """
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found: dict[int, str] = {}
    for name in sorted(os.listdir(root), key=lambda n: n.endswith(".replaced")):
        match = STEP_DIR.match(name) or REPLACED_DIR.match(name)
        path = os.path.join(root, name)
        if match and int(match.group(1)) not in found and os.path.isfile(os.path.join(path, TRAIN_STATE)):
            found[int(match.group(1))] = path
    return sorted(found.items())


def run_id_of(path: str) -> str | None:
    """The id of the run that wrote the checkpoint at ``path`` (``None`` for one without)."""
    try:
        with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as fh:
            return json.load(fh).get("run_id")
    except (OSError, ValueError):
        return None


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
    """Write step ``step`` atomically on all ranks; then prune the run's older ones to ``keep_last``.

    ``train_state["run_id"]`` names the run: pruning only ever removes checkpoints of that run, so
    another run's checkpoints in the same directory are never touched. ``rng_state`` is plain
    JSON data (numbers and lists), one file per rank.
    """
    rank = dist.get_rank()
    final = os.path.join(path_root, f"step_{step}")
    tmp = final + ".incomplete"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    comm.barrier()
    model_sd, optim_sd, _ = _merged_state(parts, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    with open(os.path.join(tmp, "rng", f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(rng_state, fh)
    # Fault-injection point for the crash-during-save test: the shards are written, the
    # checkpoint is not yet complete.
    pause = float(os.environ.get("OPENSPEED_TEST_SAVE_PAUSE_S", "0") or 0)
    if pause > 0:
        time.sleep(pause)
    comm.barrier()
    if rank == 0:
        with open(os.path.join(tmp, TRAIN_STATE), "w", encoding="utf-8") as fh:
            json.dump({**train_state, "step": step, "world_size": dist.get_world_size()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        replaced = final + ".replaced"
        if os.path.exists(final):
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)  # still a complete checkpoint of the step, found by list_complete
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        if keep_last:
            run_id = train_state.get("run_id")
            mine = [p for _, p in list_complete(os.path.dirname(path_root)) if run_id_of(p) == run_id]
            for old in mine[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
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
    rng_file = os.path.join(path, "rng", f"rank{dist.get_rank()}.json")
    if train_state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        with open(rng_file, encoding="utf-8") as fh:
            rng = json.load(fh)
    return train_state, rng
