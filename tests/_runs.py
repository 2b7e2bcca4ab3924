"""Shared test helpers for the in-process command tests: a clean process environment and a run
directory holding a random-init model as a step-1 checkpoint."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from openspeed.commands import ERROR_FILE_ENV


@pytest.fixture(autouse=True)
def plain_process(monkeypatch):
    """Errors printed here, not handed to a launcher; the device chosen afresh in each test.

    Autouse in every module that imports it."""
    from openspeed.accelerator import get_accelerator

    for name in (ERROR_FILE_ENV, "RANK", "LOCAL_RANK", "WORLD_SIZE", "OPENSPEED_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    get_accelerator.cache_clear()
    yield
    get_accelerator.cache_clear()


def untrained_run_dir(root: Path, num: int, rope_theta: float | None = None) -> tuple[dict, Path]:
    """(shapes set info, run dir): a shapes set of ``num`` samples under ``root`` and its tiny model at
    random weights (seed 11) saved as the run's step-1 DCP checkpoint."""
    import torch.distributed.checkpoint as dcp

    from openspeed.config import RunConfig, dump_yaml
    from openspeed.data.shapes import make_shapes_dataset
    from openspeed.models.init import init_weights
    from openspeed.training.model_setup import model_config_from_run

    info = make_shapes_dataset(root / "shapes", num=num, seed=2)
    cfg = RunConfig()
    cfg.model.path = str(info["model_dir"])
    if rope_theta is not None:
        cfg.model.rope_theta = rope_theta
    run_dir = root / "run"
    cfg.train.run_dir = str(run_dir)
    os.makedirs(run_dir)
    dump_yaml(cfg, str(run_dir / "config.yaml"))
    spec, config = model_config_from_run(cfg)
    model = spec.build(config)
    init_weights(model, seed=11, std=0.1)
    step_dir = run_dir / "checkpoints" / "step_1"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir), no_dist=True)
    (step_dir / "train_state.json").write_text(json.dumps({"step": 1}))
    return info, run_dir
