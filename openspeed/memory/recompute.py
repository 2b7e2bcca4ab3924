"""Activation recomputation applied from outside the model: full, selective, activation-only, norm-only.

Built on torch's own machinery: the composable ``torch.distributed._composable.checkpoint`` (the
hook-based form of non-reentrant ``torch.utils.checkpoint``; it keeps every module and parameter name,
works on modules built on the meta device and composes with FSDP2 ``fully_shard``) and, for the
op-level modes, selective activation checkpointing (``create_selective_checkpoint_contexts``) with a
policy that keeps the outputs of matmuls and attention and recomputes the cheap ops around them.

Modes (MindSpeed / Megatron names):

========== ============================== ==================================================
mode       checkpointed region            kept for backward
========== ============================== ==================================================
none       nothing                        everything autograd saves
full       each chosen transformer layer  the layer's inputs only; the whole layer reruns
selective  each chosen transformer layer  layer inputs + matmul / attention outputs; norms,
                                          rotary, activations, residual adds rerun
activation each chosen layer's MLP        MLP input + its matmul outputs; the activation
                                          function and gating multiply rerun
norm       each chosen layer's norms      norm inputs; the norm internals rerun
========== ============================== ==================================================

``num_layers`` (``memory.recompute_num_layers``) takes Megatron's ``recompute_method=block``
meaning: the first N layers of each layer stack (vision tower, decoder; under pipeline parallelism
those of the stage) are recomputed, the rest are not; ``None`` recomputes every layer.

Order in a parallel plan: tensor parallel -> context parallel -> recompute -> FSDP2 (recompute may
also be applied after ``fully_shard``, as the adaptive mode does after a measured first step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    create_selective_checkpoint_contexts,
)

from openspeed.errors import ConfigError
from openspeed.memory import _regions
from openspeed.memory.plan import MemoryPlan
from openspeed.memory.saved_bytes import record_saved

RECOMPUTE_MODES = ("none", "selective", "full", "activation", "norm")

# Outputs worth keeping: the expensive ops (recomputing them would cost real FLOPs). Looked up by
# name, since which attention kernels exist depends on the build.
_COMPUTE_INTENSIVE_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)
COMPUTE_INTENSIVE_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in _COMPUTE_INTENSIVE_NAMES
    if hasattr(torch.ops.aten, name)
)


def save_compute_intensive(ctx: SelectiveCheckpointContext, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: keep matmul / convolution / attention outputs, recompute the rest."""
    if func in COMPUTE_INTENSIVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _reporting(policy: Callable[..., CheckpointPolicy]) -> Callable[..., CheckpointPolicy]:
    """Wrap ``policy`` so the outputs it keeps are reported to active saved-bytes meters."""

    def wrapped(ctx: SelectiveCheckpointContext, func, *args, **kwargs) -> CheckpointPolicy:
        decision = policy(ctx, func, *args, **kwargs)
        if isinstance(decision, bool):
            decision = CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
        if decision in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE):
            # ``op_output`` (torch >= 2.13; the policy runs after the op): older builds cannot report.
            output = getattr(ctx, "op_output", None)
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for out in outputs:
                if isinstance(out, torch.Tensor):
                    record_saved(out)
        return decision

    return wrapped


def selective_context_fn(policy: Callable[..., CheckpointPolicy] = save_compute_intensive):
    """A ``context_fn`` for non-reentrant checkpoint running ``policy`` (fresh contexts per call)."""
    return functools.partial(create_selective_checkpoint_contexts, _reporting(policy))


def checkpoint_module(module: nn.Module, context_fn=None) -> nn.Module:
    """Recompute ``module`` in backward (non-reentrant; names and parameters unchanged).

    ``context_fn``: ``None`` for full recomputation, or e.g. :func:`selective_context_fn` for
    selective activation checkpointing. Raises ``ConfigError`` if ``module`` lies inside a module whose
    activations are offloaded, or is already recomputed.
    """
    if module in _regions.recomputed:
        raise ConfigError(f"{type(module).__name__} is already recomputed (apply_recompute called twice?)")
    if any(sub in _regions.offloaded for sub in _regions.strict_descendants(module)):
        raise ConfigError(
            f"recompute: a module inside this {type(module).__name__} has its activations offloaded; "
            "recompute the region or offload inside it, not both"
        )
    composable_checkpoint(module, context_fn=context_fn)
    _regions.recomputed.add(module)
    return module


def recompute_regions(plan: MemoryPlan, mode: str, layers: list[str]) -> list[tuple[str, str]]:
    """``(module path, kind)`` of the regions ``mode`` checkpoints for the named layers.

    ``kind`` is ``full`` (rerun everything) or ``selective`` (keep compute-intensive outputs).
    """
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"memory.recompute: expected one of {', '.join(RECOMPUTE_MODES)}, got '{mode}'")
    chosen = set(layers)
    regions: list[tuple[str, str]] = []
    for layer in plan.layers():
        if layer.name not in chosen or mode == "none":
            continue
        if mode == "full":
            regions.append((layer.name, "full"))
        elif mode == "selective":
            regions.append((layer.name, "selective"))
        elif mode == "activation":
            regions += [(path, "selective") for path in layer.part("mlp")]
        elif mode == "norm":
            regions += [(path, "full") for path in layer.part("norm")]
    return regions


def apply_recompute(
    model: nn.Module,
    mode: str,
    num_layers: int | None = None,
    *,
    plan: MemoryPlan,
    layers: list[str] | None = None,
    policy: Callable[..., CheckpointPolicy] = save_compute_intensive,
) -> list[str]:
    """Apply recomputation ``mode`` to ``model`` (in place, before or after ``fully_shard``).

    Args:
        model: the model or pipeline stage ``plan`` describes (may live on the meta device).
        mode: ``none``, ``full``, ``selective``, ``activation`` or ``norm`` (see the module docstring).
        num_layers: recompute the first N layers of each stack (``None``: all of them).
        plan: the model's :class:`MemoryPlan` (e.g. ``qwen2_5_vl.memory_plan.memory_plan(model)``).
        layers: explicit layer paths to recompute instead of ``num_layers`` (the adaptive mode).
        policy: the selective-checkpoint policy of the ``selective`` and ``activation`` modes.

    Returns the module paths of the checkpointed regions.
    """
    if layers is None:
        layers = [layer.name for layer in plan.first_layers(num_layers)]
    else:
        unknown = sorted(set(layers) - set(plan.layer_names()))
        if unknown:
            raise ConfigError(f"recompute: {unknown[0]} is not a layer of this model's memory plan")
    regions = recompute_regions(plan, mode, layers)
    for path, kind in regions:
        context_fn = selective_context_fn(policy) if kind == "selective" else None
        checkpoint_module(model.get_submodule(path), context_fn)
    return [path for path, _ in regions]
