"""Background loading of whole optimizer steps: item i is this rank's micro-batches of step i.

With ``data.num_workers > 0`` worker processes decode images and collate while the model trains;
with 0 everything happens in the training process. Either way the batches are the same, because
the samples of a step come from the schedule, not from the loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from openspeed.data.schedule import GlobalBatchSchedule


class _StepDataset(Dataset):
    def __init__(self, task, schedule: GlobalBatchSchedule, first_step: int, last_step: int,
                 dp_rank: int, dp_size: int, micro_batch_size: int):
        self.task = task
        self.schedule = schedule
        self.first_step = first_step
        self.num_steps = max(0, last_step - first_step + 1)
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, i: int) -> tuple[list[dict[str, Any]], dict[int, str]]:
        step = self.first_step + i
        skips: dict[int, str] = {}
        micro = self.schedule.micro_batches(step, self.dp_rank, self.dp_size, self.micro_batch_size)
        batches = [self.task.load_batch(self.task.train_set, indices, skips) for indices in micro]
        return batches, skips


def step_batches(task, schedule: GlobalBatchSchedule, first_step: int, last_step: int, dp_rank: int,
                 dp_size: int, micro_batch_size: int, num_workers: int) -> Iterator:
    """Yield ``(micro_batches, skipped)`` for steps ``first_step..last_step`` in order."""
    dataset = _StepDataset(task, schedule, first_step, last_step, dp_rank, dp_size, micro_batch_size)
    if num_workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    return iter(DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2,
        collate_fn=_identity,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    ))


def _identity(item):
    return item
