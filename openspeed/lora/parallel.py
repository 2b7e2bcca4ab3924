"""Tensor-parallel styles for :class:`~openspeed.lora.layer.LoRALinear`, derived from the base layer's style.

A model's plan names a style per linear layer (column- or row-parallel); :func:`lora_plan` swaps the
style of every adapted layer for its LoRA counterpart, which shards the base weight exactly as the
plain style would and the adapters so that the low-rank branch needs no communication of its own:

* column-parallel base (``W`` and ``b`` sharded on the output features): ``A`` (r, in) is replicated,
  so every rank computes the whole ``x A^T`` (r features), and ``B`` (out, r) is sharded on the output
  features like ``W``; each rank adds its slice of the update to its slice of the output.
* row-parallel base (``W`` sharded on the input features, ``b`` replicated): ``A`` is sharded on the
  input features like ``W``, so ``x A^T`` is a partial sum, and ``B`` is replicated; base and update
  are both partial sums, added before the one reduction (all-reduce, or reduce-scatter under sequence
  parallelism) the base layer does anyway.
* fused column-parallel base (``[q; k; v]`` rows, :class:`FusedColwiseParallel`): ``B`` is stored and
  redistributed like ``W``, so each rank gets the update rows of its heads of each block.

Every parameter is a DTensor on the TP mesh with its global shape and name; the adapters' input
dropout acts on the layer's input as DTensor sees it.
"""

from __future__ import annotations

import types
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from openspeed.distributed.tensor_parallel import FusedColwiseParallel
from openspeed.errors import ConfigError
from openspeed.lora.layer import LoRALinear, lora_modules


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement: Placement, src_data_rank) -> None:
    param = getattr(module, name, None)
    if param is None:
        return
    value = distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank)
    module.register_parameter(name, nn.Parameter(value, requires_grad=param.requires_grad))


def _partition_fn(base: Placement, bias: Placement, lora_a: Placement, lora_b: Placement, src_data_rank):
    """A ``distribute_module`` partition function: the LoRALinear's own parameters, then each adapter's."""

    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name == "":
            _distribute(module, "weight", mesh, base, src_data_rank)
            _distribute(module, "bias", mesh, bias, src_data_rank)
        elif name == "lora_A":
            _distribute(module, "weight", mesh, lora_a, src_data_rank)
        elif name == "lora_B":
            _distribute(module, "weight", mesh, lora_b, src_data_rank)

    return partition


def _check(module: nn.Module, style: str) -> None:
    if not isinstance(module, LoRALinear):
        raise NotImplementedError(f"{style} applies to LoRALinear modules only, got {type(module).__name__}")


class LoRAColwiseParallel(ColwiseParallel):
    """Column parallelism of a :class:`LoRALinear`: ``W``, ``b``, ``B`` sharded on the output, ``A`` whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check(module, type(self).__name__)
        return distribute_module(
            module,
            device_mesh,
            _partition_fn(Shard(0), Shard(0), Replicate(), Shard(0), self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class LoRARowwiseParallel(RowwiseParallel):
    """Row parallelism of a :class:`LoRALinear`: ``W``, ``A`` sharded on the input, ``b``, ``B`` replicated.

    The base output and the update are partial sums, reduced together once by the output function.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check(module, type(self).__name__)
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module,
            device_mesh,
            _partition_fn(Shard(1), Replicate(), Shard(1), Replicate(), self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def _fused_lora_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    placements = (_StridedShard(0, split_factor=self._openspeed_fused_chunks),)
    weight = self.weight.redistribute(placements=placements)
    bias = None if self.bias is None else self.bias.redistribute(placements=placements)
    lora_b = self.lora_B.weight.redistribute(placements=placements)
    update = F.linear(F.linear(self.lora_dropout(x), self.lora_A.weight), lora_b)
    return F.linear(x, weight, bias) + update * self.scale


class LoRAFusedColwiseParallel(FusedColwiseParallel):
    """:class:`FusedColwiseParallel` of a :class:`LoRALinear` whose output is ``chunks`` equal blocks.

    ``W``, ``b`` and ``B`` are stored ``Shard(0)`` of their global tensors and redistributed per
    forward so each rank gets its share of every block; ``A`` is replicated.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check(module, type(self).__name__)
        if module.out_features % (self.chunks * device_mesh.size()):
            raise ConfigError(
                f"parallel.tp={device_mesh.size()} does not divide the {self.chunks} blocks of "
                f"a fused projection with {module.out_features} outputs"
            )
        module._openspeed_fused_chunks = self.chunks
        # Instance-level forward: the class (and so its other instances) is untouched.
        module.forward = types.MethodType(_fused_lora_forward, module)

        def input_fn(mod, inputs, mesh):
            return ColwiseParallel._prepare_input_fn(
                self.input_layouts, self.desired_input_layouts, mod, inputs, mesh
            )

        return distribute_module(
            module,
            device_mesh,
            _partition_fn(Shard(0), Shard(0), Replicate(), Shard(0), self.src_data_rank),
            input_fn,
            self._local_output_fn,
        )


def lora_style(style: ParallelStyle) -> ParallelStyle:
    """The LoRA counterpart of a linear layer's style (same input / output layouts)."""
    if isinstance(style, FusedColwiseParallel):
        out = LoRAFusedColwiseParallel(style.chunks)
    elif isinstance(style, ColwiseParallel):
        out = LoRAColwiseParallel()
    elif isinstance(style, RowwiseParallel):
        out = LoRARowwiseParallel()
    else:
        raise ConfigError(f"LoRA under tensor parallel: no adapter layout for a layer planned as {style!r}")
    out.input_layouts = style.input_layouts
    out.output_layouts = style.output_layouts
    out.use_local_output = style.use_local_output
    out.src_data_rank = style.src_data_rank
    return out


def lora_plan(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """``plan`` with every adapted layer's style replaced by its LoRA style.

    Every :class:`LoRALinear` of ``model`` must be in the plan (a layer left whole under tensor
    parallelism would mix plain tensors and DTensors): one missing is a ``ConfigError``.
    """
    out = dict(plan)
    for name in lora_modules(model):
        if name not in plan:
            raise ConfigError(
                f"model.lora.targets: {name} has no tensor-parallel layout; leave it out with parallel.tp > 1"
            )
        out[name] = lora_style(plan[name])
    return out


__all__ = [
    "LoRAColwiseParallel",
    "LoRAFusedColwiseParallel",
    "LoRARowwiseParallel",
    "lora_plan",
    "lora_style",
]
