"""Wan DiT parallel plan, applied from outside the model (the model file has no distributed code).

Order (fixed, as for every model): tensor parallel -> context parallel -> FSDP2 (recomputation is
applied by the DiT trainer before the plan).

* Tensor parallel (:func:`apply_tensor_parallel`): heads split Megatron-style. In the self- and
  cross-attention q/k/v (and the I2V image k/v) are column-parallel and the output projection is
  row-parallel; the feed-forward is column- then row-parallel. Wan's QK-norm is an RMSNorm over the
  *whole* width (all heads together), so with the heads split it cannot run on a rank's shard alone:
  :class:`HeadShardedRMSNorm` keeps its weight sharded like the heads and all-reduces each token's
  sum of squares over the tp group (one scalar per token instead of gathering q and k). Everything
  else (patch embedding, timestep / text / image embeddings, modulation tables, norms, output head)
  is replicated as ``Replicate`` DTensors, so all parameters live on the tp mesh. The residual
  stream between the blocks is a ``Replicate`` DTensor (the row-parallel outputs stay DTensors),
  which lets the model's own modulation arithmetic mix it with the replicated tables unchanged.
* Context parallel (:func:`apply_context_parallel`): the video tokens are split across the cp group
  after the patch embedding (the 3-D RoPE tables the same way), the self-attention runs the cp
  algorithm (Ulysses: all-to-all over heads; ring; hybrid), the cross-attention attends from the
  local tokens to the whole text (and image) context with no communication, and the output tokens
  are gathered before the unpatchify.
* FSDP2 / HSDP over the data-parallel dims (times cp, whose ranks' gradients are summed like
  data-parallel ones), one unit per transformer block.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
)

from openspeed.distributed import comm
from openspeed.distributed.context_parallel import ContextParallel
from openspeed.distributed.context_parallel.modules import is_suspended, route_attention
from openspeed.distributed.fsdp import apply_fsdp
from openspeed.distributed.mesh import ParallelDims
from openspeed.distributed.tensor_parallel import ReplicateParallel, apply_plan, check_divisible
from openspeed.errors import ConfigError
from openspeed.memory.apply import apply_memory_config
from openspeed.models.wan.config import WanConfig
from openspeed.models.wan.memory_plan import memory_plan

# --------------------------------------------------------------------------------------------------
# Tensor parallel
# --------------------------------------------------------------------------------------------------


def check_tensor_parallel_sizes(config: WanConfig, tp: int) -> None:
    """One-line :class:`ConfigError` naming the first split size that ``tp`` does not divide."""
    if tp > 1:
        sizes = (("num_attention_heads", config.num_attention_heads), ("ffn_dim", config.ffn_dim))
        check_divisible(tp, sizes)


def _head_sharded_rms_norm(self: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm of the full width from this rank's column shard ``x`` (see :class:`HeadShardedRMSNorm`)."""
    width = self.normalized_shape[-1]
    eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default
    xf = x.float()
    # Sum of squares of the whole row: the local part, summed over the tp ranks.
    squares = comm.sum_over_group(xf.pow(2).sum(-1, keepdim=True), self._openspeed_tp_group)
    out = xf * torch.rsqrt(squares / width + eps)
    if self.weight is not None:
        out = out * self.weight.to_local().float()
    return out.to(x.dtype)


class HeadShardedRMSNorm(ParallelStyle):
    """An ``nn.RMSNorm`` over the full output width of a column-parallel projection, run on its shard.

    Wan normalises q and k across all heads, so each rank's share of the heads needs the sum of
    squares of the whole row: it is all-reduced over the tp group (one float per token). The weight
    is stored ``Shard(0)`` (each rank the entries of its heads, matching the column split) and the
    input and output are plain local tensors. Equals the unsplit norm up to float summation order.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.RMSNorm) or len(module.normalized_shape) != 1:
            raise NotImplementedError("HeadShardedRMSNorm only supports a 1-D nn.RMSNorm")
        if module.normalized_shape[0] % device_mesh.size():
            raise ConfigError(
                f"parallel.tp={device_mesh.size()} does not divide the QK-norm width "
                f"{module.normalized_shape[0]}"
            )

        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            if mod is module and mod.weight is not None and not isinstance(mod.weight, DTensor):
                weight = mod.weight
                sharded = distribute_tensor(weight, mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                mod.register_parameter("weight", nn.Parameter(sharded, requires_grad=weight.requires_grad))

        module._openspeed_tp_group = device_mesh.get_group()
        # Instance-level forward (as FusedColwiseParallel does): the class and its other instances are
        # untouched.
        module.forward = types.MethodType(_head_sharded_rms_norm, module)
        return distribute_module(module, device_mesh, partition)


def _attention_plan(prefix: str, image_kv: bool) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        plan[f"{prefix}.{name}"] = ColwiseParallel()
    for name in ("q_norm", "k_norm"):
        plan[f"{prefix}.{name}"] = HeadShardedRMSNorm()
    if image_kv:
        plan[f"{prefix}.image_k_proj"] = ColwiseParallel()
        plan[f"{prefix}.image_v_proj"] = ColwiseParallel()
        plan[f"{prefix}.image_k_norm"] = HeadShardedRMSNorm()
    # The attention output stays a Replicate DTensor: it joins the DTensor residual stream.
    plan[f"{prefix}.o_proj"] = RowwiseParallel(use_local_output=False)
    return plan


def _tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "patch_embed": ReplicateParallel(),
        "text_embed": ReplicateParallel(),
        # The timestep embedding and its modulation stay DTensors: the blocks and the output head
        # add them to replicated modulation tables.
        "time_embed": ReplicateParallel(use_local_output=False),
        "time_modulation": ReplicateParallel(use_local_output=False),
        "out_proj": ReplicateParallel(),
    }
    if model.image_embed is not None:
        plan["image_embed"] = ReplicateParallel()
    replicated = (Replicate(), None, None, Replicate(), None, None)
    for i, block in model.blocks.named_children():
        prefix = f"blocks.{i}"
        # The residual stream (a plain tensor from the patch embedding, a DTensor after a block) and
        # the timestep modulation enter each block as Replicate DTensors.
        plan[prefix] = PrepareModuleInput(
            input_layouts=replicated, desired_input_layouts=replicated, use_local_output=False
        )
        if not isinstance(block.cross_attn_norm, nn.Identity):
            plan[f"{prefix}.cross_attn_norm"] = ReplicateParallel(use_local_output=False)
        plan.update(_attention_plan(f"{prefix}.self_attn", image_kv=False))
        plan.update(_attention_plan(f"{prefix}.cross_attn", image_kv=block.cross_attn.has_image_kv))
        plan[f"{prefix}.ffn.fc1"] = ColwiseParallel()
        plan[f"{prefix}.ffn.fc2"] = RowwiseParallel(use_local_output=False)
    return plan


def _replicate_remaining(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make every parameter the plan left plain (the modulation tables) a ``Replicate`` DTensor."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                replicated = distribute_tensor(param, mesh, [Replicate()])
                module.register_parameter(name, nn.Parameter(replicated, requires_grad=param.requires_grad))


def _plain_sample(module: nn.Module, args: Any, output: Any) -> Any:
    sample = getattr(output, "sample", None)
    if isinstance(sample, DTensor):
        output.sample = sample.to_local()
    elif isinstance(output, tuple) and output and isinstance(output[0], DTensor):
        output = (output[0].to_local(), *output[1:])
    return output


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Split a Wan DiT (meta or materialised) over the 1-D ``tp_mesh``, in place.

    Every parameter becomes a DTensor on ``tp_mesh`` with its global shape and name unchanged
    (split ones ``Shard``, the rest ``Replicate``); the output ``sample`` is a plain tensor, the same
    on every tp rank. Weights must be (re-)initialised or loaded afterwards shard-wise (as
    the training model builder does). Needs ``tp`` to divide the head count and ``ffn_dim``.
    """
    check_tensor_parallel_sizes(model.config, tp_mesh.size())
    apply_plan(model, tp_mesh, _tensor_parallel_plan(model))
    _replicate_remaining(model, tp_mesh)
    model.register_forward_hook(_plain_sample)
    return model


# --------------------------------------------------------------------------------------------------
# Context parallel
# --------------------------------------------------------------------------------------------------


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> nn.Module:
    """Split the video tokens of a Wan DiT across the cp group, in place (hooks; no model change).

    The patch embedding, the condition embeddings and the timestep embedding run whole on every cp
    rank. Each block then gets this rank's video tokens (``cp.shard``: contiguous for Ulysses,
    zigzag for ring / hybrid) and the same rows of the 3-D RoPE tables; its self-attention runs the
    cp algorithm (Ulysses handles head counts the group does not divide), its cross-attention
    attends from the local tokens to the whole text / image context (no communication), and the
    output head's tokens are gathered back in global order before the unpatchify, so the output is
    the whole latent on every rank. Gradients: each rank's parameters get its own tokens' share
    (the cp ranks' gradients must be summed, as FSDP over ``dp_shard x cp`` does).

    The token count must be a multiple of ``cp.seq_multiple`` (one-line error otherwise); one
    timestep per token (Wan2.2 TI2V) is refused. Inside ``modules.suspended()`` the model runs whole.
    """
    state = {"seq": 0}
    patch = model.config.patch_size
    block_signature = inspect.signature(model.blocks[0].forward)

    def decide(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        state["seq"] = 0
        if is_suspended():
            return
        bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
        hidden, timestep = bound["hidden_states"], bound["timestep"]
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
            raise ConfigError("context parallelism does not support one timestep per token (Wan2.2 TI2V) yet")
        frames, height, width = hidden.shape[2:]
        seq = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
        if seq % cp.seq_multiple:
            raise ConfigError(
                f"context parallel {cp.algo} over {cp.size} ranks needs the video token count to be a "
                f"multiple of {cp.seq_multiple}, got {seq} ({frames}x{height}x{width} latent, patch {patch})"
            )
        state["seq"] = seq

    def split(mod: nn.Module, args: tuple, kwargs: dict):
        seq = state["seq"]
        if not seq:
            return None
        bound = block_signature.bind(*args, **kwargs)
        # Whole-sequence inputs only: the first block's x (later blocks get the local output).
        for name, dim in (("x", 1), ("cos", 0), ("sin", 0)):
            value = bound.arguments[name]
            if isinstance(value, torch.Tensor) and value.shape[dim] == seq:
                bound.arguments[name] = cp.shard(value, dim)
        return bound.args, bound.kwargs

    def gather(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not state["seq"]:
            return None
        return cp.gather(output, 1)

    model.register_forward_pre_hook(decide, with_kwargs=True)
    for block in model.blocks:
        # prepend: split before a tensor-parallel input preparation turns x into a DTensor.
        block.register_forward_pre_hook(split, with_kwargs=True, prepend=True)
        route_attention(block.self_attn, cp)
    model.out_proj.register_forward_hook(gather)
    return model


# --------------------------------------------------------------------------------------------------
# The run's layout
# --------------------------------------------------------------------------------------------------


def parallelize(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    """Apply the run's parallel layout to a Wan model built on the meta device."""
    tp = dims.sizes.get("tp", 1)
    if tp > 1:
        check_tensor_parallel_sizes(model.config, tp)  # before any mesh work: a one-line error
        apply_tensor_parallel(model, dims.mesh["tp"])
    if dims.cp_size > 1:
        apply_context_parallel(model, dims.context_parallel())
    if getattr(cfg, "memory", None) is not None:
        apply_memory_config(model, cfg.memory, memory_plan(model))
    if dims.fsdp_enabled:
        apply_fsdp(model, dims.dp_mesh(), list(model.blocks), zero_stage=cfg.parallel.zero_stage,
                   precision=cfg.train.precision)
    return model
