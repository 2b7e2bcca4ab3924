"""Background loading of whole optimizer steps: item i is this rank's micro-batches of step i.

With ``data.num_workers > 0`` worker processes decode images and collate while the model trains;
with 0 one background thread of the training process loads the next step while the current one
trains (image decoding, tokenising and the array work release the GIL, so on a machine with a spare
core this hides most of the loading; the batches never cross a process boundary). Either way the
batches are the same, because the samples of a step come from the schedule, not from the loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from openspeed.data.schedule import GlobalBatchSchedule


class _StepDataset(Dataset):
    def __init__(self, task, schedule: GlobalBatchSchedule, first_step: int, last_step: int,
                 dp_rank: int, dp_size: int, micro_batch_size: int, annotate=None, pin_memory: bool = False):
        self.task = task
        self.annotate = annotate
        self.pin_memory = pin_memory
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
        if self.annotate is not None:
            for batch in batches:
                self.annotate(batch)
        if self.pin_memory:
            batches = pinned(batches)
        return batches, skips


def pinned(tree):
    """``tree`` (tensors in dicts, lists and tuples) with every CPU tensor in page-locked memory, so
    the copy to the device can be asynchronous (``.to(device, non_blocking=True)``)."""
    if isinstance(tree, torch.Tensor):
        return tree.pin_memory() if tree.device.type == "cpu" else tree
    if isinstance(tree, dict):
        return {k: pinned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(pinned(v) for v in tree)
    return tree


def step_batches(task, schedule: GlobalBatchSchedule, first_step: int, last_step: int, dp_rank: int,
                 dp_size: int, micro_batch_size: int, num_workers: int, annotate=None,
                 pin_memory: bool = False) -> Iterator:
    """Yield ``(micro_batches, skipped)`` for steps ``first_step..last_step`` in order.

    ``annotate(batch)``, if given, adds entries to each micro-batch where it is loaded (e.g. its
    FLOPs count), off the training thread. ``pin_memory`` (for a CUDA / NPU run) puts the batches'
    tensors in page-locked memory off the training thread too, so copying them to the device does
    not stall it.

    The returned iterator also has ``wait()`` (call it before the trainer uses the task's data
    objects itself, e.g. to validate) and ``close()``.
    """
    dataset = _StepDataset(task, schedule, first_step, last_step, dp_rank, dp_size, micro_batch_size, annotate,
                           pin_memory=pin_memory and num_workers == 0)
    if num_workers == 0:
        return _ThreadPrefetcher(dataset)
    return _WorkerLoader(DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=2,
        collate_fn=_identity,
        pin_memory=pin_memory,  # in the main process's pinning thread: workers never touch the device
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    ))


def _identity(item):
    return item


class _WorkerLoader:
    """A ``DataLoader`` over worker processes, with the same ``wait``/``close`` as the thread loader."""

    def __init__(self, loader: DataLoader):
        self._it = iter(loader)

    def __iter__(self) -> _WorkerLoader:
        return self

    def __next__(self):
        return next(self._it)

    def wait(self) -> None:
        """Nothing to wait for: workers are other processes and share nothing with the trainer."""

    def close(self) -> None:
        """Stop the worker processes."""
        self._it = iter(())


class _ThreadPrefetcher:
    """Iterate ``dataset[0..n-1]`` with item ``i + 1`` loading in a background thread while the caller
    works on item ``i``. A loading error is raised by the ``next()`` that would have returned the item.

    Call :meth:`wait` before using the task's data objects (tokenizer, processor) from the calling
    thread for something else, e.g. validation: it waits for the load in flight, so the two never
    run at the same time.
    """

    def __init__(self, dataset: Dataset):
        self._dataset = dataset
        self._next_index = 0
        self._pending: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openspeed-data")
        self._submit()

    def _submit(self) -> None:
        if self._next_index < len(self._dataset):
            self._pending = self._pool.submit(self._dataset.__getitem__, self._next_index)
            self._next_index += 1
        else:
            self._pending = None
            self._pool.shutdown(wait=False)

    def __iter__(self) -> _ThreadPrefetcher:
        return self

    def __next__(self):
        if self._pending is None:
            raise StopIteration
        item = self._pending.result()
        self._submit()
        return item

    def wait(self) -> None:
        """Block until the load in flight (if any) has finished; its result is kept for ``next()``."""
        if self._pending is not None:
            self._pending.exception()

    def close(self) -> None:
        """Drop the load in flight and stop the thread."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._pool.shutdown(wait=True)
