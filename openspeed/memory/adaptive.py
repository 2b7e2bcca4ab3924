"""Adaptive recompute: choose which layers to recompute (and offload) so saved activations fit a budget.

From one measured forward without recomputation (a :class:`SavedBytesReport` with per-layer bytes,
see :func:`measure_layers`), each layer ``i`` has

* ``kept_i``: the device bytes saved while it runs, and
* ``inputs_i``: the bytes of its inputs, which is what stays saved when it is fully recomputed
  (non-reentrant checkpoint keeps exactly the region's inputs).

:func:`plan_adaptive` recomputes layers until the estimate fits ``budget``: within each layer stack
the first layers first (the ``recompute_num_layers`` order), and between stacks the one whose next
layer frees more bytes; if even recomputing every layer does not fit and offload is allowed, the recomputed
layers' inputs go to host memory too. If nothing fits, it raises one ``ConfigError`` line.

The budget covers one micro-batch's saved activations plus ``static_bytes`` (what the caller knows
stays resident anyway: parameters, gradients, optimizer state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from openspeed.errors import ConfigError
from openspeed.memory.offload import apply_activation_offload
from openspeed.memory.plan import MemoryPlan
from openspeed.memory.recompute import apply_recompute
from openspeed.memory.saved_bytes import SavedBytesMeter, SavedBytesReport

GB = 1024**3


@dataclass
class AdaptivePlan:
    """The choice: layers to recompute fully, layers whose (remaining) activations go to the host."""

    recompute: list[str] = field(default_factory=list)
    offload: list[str] = field(default_factory=list)
    measured_bytes: int = 0
    """Saved device bytes of the measured forward (no recompute), plus ``static_bytes``."""
    estimated_bytes: int = 0
    """The same estimated under this plan."""
    budget_bytes: int = 0


def measure_layers(
    model: nn.Module, plan: MemoryPlan, forward: Callable[[], object]
) -> tuple[SavedBytesReport, object]:
    """Run ``forward()`` under a meter attributing saved bytes to each layer of ``plan``.

    Returns ``(report, forward's result)``; backward may follow as usual.
    """
    modules = {name: model.get_submodule(name) for name in plan.layer_names()}
    with SavedBytesMeter(modules, exclude=model) as meter:
        result = forward()
    return meter.report, result


def max_over_ranks(report: SavedBytesReport, group=None) -> SavedBytesReport:
    """The element-wise maximum of ``report`` over the ranks of ``group`` (default: all ranks).

    Plan from this on every rank: ranks measure different batches, and they must all choose the
    same layers (a recomputed tensor-parallel layer repeats its collectives in backward).
    """
    import torch.distributed as dist

    from openspeed.distributed.comm import max_counts
    from openspeed.memory.saved_bytes import ModuleBytes

    if not dist.is_available() or not dist.is_initialized():
        return report
    names = sorted(report.per_module)
    parts = [report.unattributed, *(report.per_module[n] for n in names)]
    values = [report.device, report.host, *(v for b in parts for v in (b.device, b.host, b.inputs))]
    out = max_counts(values, group=group)
    blocks = [ModuleBytes(*out[2 + 3 * i : 5 + 3 * i]) for i in range(len(parts))]
    return SavedBytesReport(
        device=out[0], host=out[1], per_module=dict(zip(names, blocks[1:])), unattributed=blocks[0]
    )


def plan_adaptive(
    report: SavedBytesReport,
    plan: MemoryPlan,
    budget_bytes: int,
    static_bytes: int = 0,
    allow_offload: bool = False,
) -> AdaptivePlan:
    """Fewest layers to recompute (then offload) so the estimated saved bytes fit ``budget_bytes``."""
    names = plan.layer_names()
    missing = [n for n in names if n not in report.per_module]
    if missing:
        raise ValueError(f"the report has no bytes for layer {missing[0]}: measure with measure_layers")
    measured = report.device + static_bytes
    current = measured
    gains = {n: report.per_module[n].device - report.per_module[n].inputs for n in names}
    # Within a stack layers are taken first to last (recompute_num_layers' "first N"); between
    # stacks, the one whose next layer frees more goes first.
    queues = [[layer.name for layer in stack.layers] for stack in plan.stacks]
    chosen: list[str] = []
    while current > budget_bytes:
        heads = [q for q in queues if q and gains[q[0]] > 0]
        if not heads:
            break
        best = max(heads, key=lambda q: gains[q[0]])
        name = best.pop(0)
        chosen.append(name)
        current -= gains[name]
    offload: list[str] = []
    if current > budget_bytes and allow_offload:
        # Every layer worth recomputing is; what they still keep (their inputs) can go to the host.
        for name in names:
            if current <= budget_bytes:
                break
            offload.append(name)
            current -= (
                report.per_module[name].device if name not in chosen else report.per_module[name].inputs
            )
    if current > budget_bytes:
        how = (
            "full recompute and offload of every layer" if allow_offload else "full recompute of every layer"
        )
        raise ConfigError(
            f"memory.budget_gb={budget_bytes / GB:.4g} cannot be met: even {how} keeps "
            f"{current / GB:.4g} GB saved for backward (measured {measured / GB:.4g} GB without recompute)"
        )
    return AdaptivePlan(
        recompute=[n for n in names if n in chosen],
        offload=offload,
        measured_bytes=measured,
        estimated_bytes=current,
        budget_bytes=budget_bytes,
    )


def apply_adaptive(model: nn.Module, plan: MemoryPlan, choice: AdaptivePlan) -> AdaptivePlan:
    """Apply ``choice``: full recompute of its layers, then host offload of its offload layers."""
    if choice.recompute:
        apply_recompute(model, "full", plan=plan, layers=choice.recompute)
    if choice.offload:
        apply_activation_offload(model, choice.offload, plan=plan)
    return choice


def adaptive_recompute(
    model: nn.Module,
    plan: MemoryPlan,
    report: SavedBytesReport,
    budget_gb: float,
    static_bytes: int = 0,
    allow_offload: bool = False,
) -> AdaptivePlan:
    """:func:`plan_adaptive` for ``memory.budget_gb``, then :func:`apply_adaptive`; returns the plan."""
    choice = plan_adaptive(report, plan, int(budget_gb * GB), static_bytes, allow_offload)
    return apply_adaptive(model, plan, choice)
