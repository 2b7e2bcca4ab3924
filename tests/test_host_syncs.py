"""The training loop keeps the step on the device: no host copy per micro-batch.

On a GPU every ``.item()``, ``.tolist()``, ``.cpu()`` or ``float(tensor)`` of a device tensor stalls the
host until the device has caught up. The loop in ``openspeed/training/`` reads the step's loss and
gradient norm back once per step (to log them and to decide whether the update is finite), never
per micro-batch. On the CPU every tensor is a host tensor, so the test counts the calls by the code
that makes them: it patches the methods and keeps the calls whose caller is in ``training/``.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

from tests._train_utils import make_tiny_run_config

TRAINING = os.sep + os.path.join("openspeed", "training") + os.sep
SYNCS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


def _count_training_syncs(config: str, overrides: list[str], monkeypatch) -> dict[str, int]:
    """Run the trainer in this process; calls of each sync method made by ``training/`` code."""
    from openspeed.config import load_config
    from openspeed.training.trainer import run_training

    counts = dict.fromkeys(SYNCS, 0)
    main = threading.get_ident()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if TRAINING in caller and threading.get_ident() == main:
                counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    cfg = load_config(config, overrides)
    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, counting(name))
        summary = run_training(cfg)
    assert summary["steps"] == cfg.train.max_steps
    return counts


def test_the_step_reads_back_once_per_step_not_per_micro_batch(shapes_dir, tmp_path, monkeypatch):
    # No validation, no checkpoints: the counts are the steps' own.
    config = make_tiny_run_config(str(tmp_path), shapes_dir, train={"eval_max_samples": 0},
                                  data={"val_path": None})

    def syncs(name: str, steps: int, global_batch: int) -> int:
        overrides = [f"train.run_dir={tmp_path / name}", f"train.max_steps={steps}",
                     "train.micro_batch_size=2", f"train.global_batch_size={global_batch}"]
        return sum(_count_training_syncs(config, overrides, monkeypatch).values())

    one_micro, four_micro = syncs("mb1", 2, 2), syncs("mb4", 2, 8)
    assert one_micro == four_micro, (one_micro, four_micro)  # nothing per micro-batch
    per_step = syncs("mb4_3steps", 3, 8) - four_micro
    # The step's loss (for the log) and its gradient norm (clipping, the finite check): two copies.
    assert 0 < per_step <= 2, per_step
