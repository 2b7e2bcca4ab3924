"""Shared helpers for tests that run the trainer as a user would (a subprocess of the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_run_config(tmp_dir: str, data_dir: str, **sections) -> str:
    """Write a small training config over the shapes set in ``data_dir``; returns its path."""
    import yaml

    cfg = {
        "model": {"path": os.path.join(data_dir, "model"), "init_std": 0.1, "rope_theta": 10.0},
        "data": {
            "train_path": os.path.join(data_dir, "train.jsonl"),
            "val_path": os.path.join(data_dir, "val.jsonl"),
            "max_seq_len": 128,
        },
        "train": {
            "run_dir": os.path.join(tmp_dir, "run"),
            "max_steps": 5,
            "seed": 7,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "eval_max_samples": 8,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"interval": 0, "save_final": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = os.path.join(tmp_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return path


def run_train(config: str, *args: str, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "openspeed", "train", config, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def train_curve(run_dir: str) -> dict[int, tuple[float, float]]:
    """step -> (loss, gradient norm before clipping) of a run's training steps."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r}


def assert_curves_close(curve: dict[int, tuple[float, float]], reference: dict[int, tuple[float, float]],
                        rel: float = 1e-4, steps: tuple[int, ...] = (1, 2, 3, 4, 5)) -> None:
    """Same steps as the reference, each loss and each gradient norm within ``rel`` (relative) of it.

    The gradient norm is what a loss comparison cannot see: AdamW is invariant to a constant gradient
    factor (a doubled tied-embedding gradient, a missing divide over the data-parallel ranks) and the
    clip hides it too, so the losses of such a run still match.
    """
    import math

    assert sorted(curve) == sorted(reference) == list(steps)
    for step, (ref_loss, ref_norm) in reference.items():
        loss, norm = curve[step]
        assert math.isfinite(ref_loss) and math.isfinite(ref_norm) and ref_norm > 0
        assert abs(loss - ref_loss) <= rel * abs(ref_loss), ("loss", step, loss, ref_loss)
        assert abs(norm - ref_norm) <= rel * ref_norm, ("grad_norm", step, norm, ref_norm)


def write_base_model(shapes_dir: str, out: str) -> str:
    """The shapes set's tiny model directory plus seeded weights (an HF-format base for peft)."""
    import shutil

    from safetensors.torch import save_file

    from openspeed.config import RunConfig
    from openspeed.models.init import init_weights
    from openspeed.training.model_setup import model_config_from_run

    shutil.copytree(os.path.join(shapes_dir, "model"), out)
    cfg = RunConfig()
    cfg.model.path = out
    spec, config = model_config_from_run(cfg)
    model = spec.build(config)
    init_weights(model, seed=3, std=0.1)
    weights = {k: v.contiguous() for k, v in spec.native_to_hf(model.state_dict(), config).items()}
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out
