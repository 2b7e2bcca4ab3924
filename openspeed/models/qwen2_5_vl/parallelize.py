"""Qwen2.5-VL parallel plan, applied from outside the model (the model file has no distributed code).

Order (fixed, as torchtitan documents it): tensor parallel -> context parallel -> recomputation ->
FSDP2. Today only FSDP2 / HSDP over the data-parallel dims is applied; the other dims are refused
by the trainer until they land.
"""

from __future__ import annotations

from torch import nn

from openspeed.distributed.fsdp import apply_fsdp
from openspeed.distributed.mesh import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    """Apply the run's parallel layout to a Qwen2.5-VL model built on the meta device."""
    if dims.dp_enabled:
        # One FSDP unit per transformer block (vision and language), the root keeps the rest:
        # patch embed, merger, embeddings, final norm and head.
        blocks = [*model.visual.blocks, *model.language_model.layers]
        apply_fsdp(model, dims.dp_mesh(), blocks, zero_stage=cfg.parallel.zero_stage)
    return model
