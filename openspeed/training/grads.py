"""Global gradient-norm clipping over parameters of any layout: plain, FSDP-sharded, tensor-parallel
DTensors on different meshes, and pipeline stages that each hold a different part of the model."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from openspeed.distributed.comm import all_reduce, comm_device


def _mesh_key(grad: torch.Tensor):
    # Meshes compare by value: FSDP builds a mesh object per parameter, all equal.
    if isinstance(grad, DTensor):
        return (grad.device_mesh, tuple(grad.placements))
    return grad.device


def global_grad_norm(params: Iterable[torch.Tensor], stage_group: dist.ProcessGroup | None = None) -> float:
    """The 2-norm of all gradients as one vector, the same value on every rank.

    Squares are summed in float32 on the device (the per-group norms are float32 already).

    DTensor gradients are grouped by mesh and placements, and each group's norm is reduced
    once over its mesh (a sum of squares for shards, nothing for replicas). ``stage_group`` sums
    the squares over pipeline stages, which hold disjoint parameters.
    """
    groups: dict = defaultdict(list)
    for param in params:
        if param.grad is not None:
            groups[_mesh_key(param.grad)].append(param.grad)
    total = torch.zeros((), dtype=torch.float32, device=comm_device())
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total += norm.detach().float().to(total.device) ** 2
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        all_reduce(total, group=stage_group)
    return math.sqrt(float(total))  # the step's one host copy of the norm (clipping and logging need it)


def clip_grad_norm(
    params: list[torch.Tensor], max_norm: float, stage_group: dist.ProcessGroup | None = None,
    exclude_from_norm: Iterable[torch.Tensor] = (),
) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (<= 0: no clipping); return the norm.

    ``exclude_from_norm``: parameters counted elsewhere (the last stage's copy of a tied embedding,
    whose gradient equals the first stage's) — still clipped, not counted twice.
    """
    skip = {id(p) for p in exclude_from_norm}
    norm = global_grad_norm([p for p in params if id(p) not in skip], stage_group)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        with torch.no_grad():
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(coef)
    return norm
