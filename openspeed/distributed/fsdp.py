"""Data parallelism through FSDP2 (``fully_shard``): ZeRO-3 / ZeRO-2 over ``dp_shard``, replication
over ``dp_replicate`` (HSDP when both are > 1, DDP-like when only ``dp_replicate`` is)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    blocks: Iterable[nn.Module],
    zero_stage: int = 3,
    precision: str = "fp32",
) -> nn.Module:
    """Shard each block, then the root, over the 2-D (dp_replicate, dp_shard) mesh.

    ``zero_stage=2`` keeps parameters gathered from forward to backward (no re-gather in backward);
    3 frees them after forward. Gradients are reduced in fp32 and summed, not averaged: the loss
    is already normalised by the global token count, so a sum over ranks gives the global mean.

    ``precision="bf16"`` (``train.precision``): the sharded parameters stay fp32 (the optimizer's
    master weights) and are all-gathered and computed with in bf16 (half the bytes on the wire and
    in memory); gradients are reduced in fp32 and land in the fp32 shards.
    """
    param_dtype = torch.bfloat16 if precision == "bf16" else None
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = zero_stage == 3
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root holds embeddings and the head, used at both ends of the step: keep them gathered.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Gloo has no PREMUL_SUM: ask for plain SUM collectives (a factor of 1 needs no scaling).
            module.set_force_sum_reduction_for_comms(True)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch of a step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


@contextmanager
def gathered_parameters(model: nn.Module, zero_stage: int = 3):
    """Keep every FSDP unit's parameters gathered inside the block (for inference-style work).

    Once gathered, forwards run without collectives, so ranks may run different numbers of them
    (e.g. greedy decoding that stops early, or a rank with fewer samples). Costs one full copy of
    the parameters per rank while inside.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    # Roots (the model, or each pipeline stage) are not inside another unit.
    inner = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # Roots stay gathered after forward in training too (see apply_fsdp).
            unit.set_reshard_after_forward(id(unit) in inner and zero_stage == 3, recurse=False)
