"""The run's ``memory`` settings applied to one model (or pipeline stage), in the parallel plan."""

from __future__ import annotations

from torch import nn

from openspeed.memory.offload import apply_activation_offload
from openspeed.memory.plan import MemoryPlan
from openspeed.memory.recompute import apply_recompute


def apply_memory_config(model: nn.Module, memory, plan: MemoryPlan | None) -> list[str]:
    """Recompute and activation offload as ``memory`` (a ``MemoryConfig``) asks; returns the modules touched.

    Call after tensor / context parallel and before FSDP (the fixed order of the parallel plans).
    ``plan`` is the model family's :class:`MemoryPlan` (``None``: the family has none, and asking for
    a saver is a one-line error). ``memory.budget_gb`` (adaptive recompute) is decided by the
    trainer after a measured first step, not here.
    """
    wants = memory.recompute != "none" or bool(memory.offload_activations)
    if not wants:
        return []
    if plan is None:
        from openspeed.errors import ConfigError

        raise ConfigError("memory.recompute / memory.offload_activations: this model family has no memory plan")
    touched: list[str] = []
    if memory.recompute != "none":
        touched += apply_recompute(model, memory.recompute, memory.recompute_num_layers, plan=plan)
    if memory.offload_activations:
        touched += apply_activation_offload(model, list(memory.offload_activations), plan=plan)
    return touched
