"""What the one training loop asks of a model family's task.

A family's :class:`~openspeed.models.registry.ModelSpec` names its task class; the loop builds it
with ``task(run_config, device, model_config)`` and uses only what :class:`Task` lists. The Qwen2.5-VL
task (:mod:`openspeed.tasks.vlm_sft`) and Wan's (:mod:`openspeed.models.wan.task`) are the two
worked examples.

One optimizer step, as the loop runs it::

    batches = [task.load_batch(task.train_set, indices, skips) for each micro-batch]  # loader thread
    num_items = sum over dp ranks of task.count_targets(batch)       # the loss's global normaliser
    for batch in batches:
        for inputs in task.forwards(batch, step):                    # one forward each
            loss = task.loss(model, inputs, num_items, step)         # already divided by num_items
            loss.backward()

so the gradient summed over micro-batches and ranks is that of the global mean, under any layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class EvalContext:
    """Where an evaluation runs: the run config, the accelerator and this rank's data-parallel slice."""

    cfg: Any
    acc: Any
    dp_group: Any
    dp_rank: int
    dp_size: int
    step: int
    started: float = 0.0
    """``time.perf_counter()`` when training started (reports give the run's time so far)."""


class Task(Protocol):
    """A family's training task (see the module docstring for how the loop drives it).

    Attributes:
        train_set / val_set: indexable data sets (``val_set`` ``None`` without ``data.val_path``).
        skipped: training samples that could not be used, index -> reason (each counted once).
        count_name: what :meth:`count_targets` counts, as logged (``target_tokens``, ``samples``).
        cp_splits_loss: whether each context-parallel rank's loss covers only its share of the
            sequence (summed over cp), rather than the whole loss (then summed over dp only).
        uneven_forwards: whether ranks may need different numbers of forwards per micro-batch (the
            loop then pads every rank to the most with weightless forwards, since FSDP needs all).
    """

    train_set: Any
    val_set: Any
    skipped: dict[int, str]
    count_name: str
    cp_splits_loss: bool
    uneven_forwards: bool

    def load_batch(self, dataset, indices: list[int], skips: dict[int, str] | None = None) -> Any:
        """The micro-batch of ``indices`` (bad samples left out and noted in ``skips``)."""

    def annotate(self, batch: Any) -> None:
        """Called on each micro-batch where it is loaded (off the training thread): cache what the
        step needs to know about it, such as its FLOPs."""

    def configure_context_parallel(self, cp) -> None:
        """The run splits sequences over ``cp``: pad batches as it needs."""

    def count_targets(self, batch: Any) -> int:
        """What the loss of ``batch`` is a sum over (target tokens, weighted samples)."""

    def count_tokens(self, batch: Any) -> int:
        """Tokens the model processes for ``batch`` (throughput)."""

    def forwards(self, batch: Any, step: int) -> list[Any]:
        """The inputs of the forwards one micro-batch takes (most tasks: ``[batch]``)."""

    def flops(self, inputs: Any) -> float:
        """Analytic training FLOPs of one forward's inputs (forward + backward)."""

    def loss(self, model: nn.Module, inputs: Any, num_items: int, step: int) -> torch.Tensor:
        """This forward's summed loss divided by the step's global ``num_items``."""

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        """The family's validation (collective over the dp group); returns the record to log."""

    def final_report(self, model: nn.Module, ctx: EvalContext, final_eval: dict[str, Any]) -> dict[str, Any]:
        """After the last step (``final_eval``: the last validation record, may be empty): returns
        ``{"metrics": record to log, "summary": entries for the run summary, "lines": to print}``."""


__all__ = ["EvalContext", "Task"]
