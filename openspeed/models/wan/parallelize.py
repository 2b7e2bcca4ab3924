"""Wan DiT parallel plan, applied from outside the model (the model file has no distributed code).

Today: FSDP2 / HSDP over the data-parallel dims, one unit per transformer block, the root keeping the
patch embedding, the condition embeddings and the output head. Tensor parallelism is not planned yet
and is refused with one line.
"""

from __future__ import annotations

from torch import nn

from openspeed.distributed.fsdp import apply_fsdp
from openspeed.distributed.mesh import ParallelDims
from openspeed.errors import ConfigError


def parallelize(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    """Apply the run's parallel layout to a Wan model built on the meta device."""
    if dims.sizes.get("tp", 1) > 1:
        raise ConfigError(f"parallel.tp={dims.sizes['tp']}: wan has no tensor-parallel plan yet (use tp=1)")
    if dims.dp_enabled:
        apply_fsdp(model, dims.dp_mesh(), list(model.blocks), zero_stage=cfg.parallel.zero_stage)
    return model
