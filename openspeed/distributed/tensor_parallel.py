"""Tensor and sequence parallelism through DTensor (``torch.distributed.tensor.parallel``).

Model-agnostic building blocks; a model's ``parallelize.py`` composes them into its plan. The
conventions (Megatron-style, as torchtitan applies them):

* attention q/k/v and MLP gate/up are column-parallel (output features sharded, heads split),
  attention output and MLP down projections are row-parallel (input features sharded, outputs
  all-reduced, or reduce-scattered on the sequence dim under sequence parallelism);
* the input embedding is vocabulary-parallel (row-parallel on ``nn.Embedding``) and the LM head is
  column-parallel with its logits left as a DTensor sharded on the vocabulary, so the loss runs
  under :func:`loss_parallel` and full logits are never gathered in training;
* every parameter that is not split becomes a ``Replicate`` DTensor on the same mesh
  (:class:`ReplicateParallel`, :class:`~torch.distributed.tensor.parallel.SequenceParallel`), so a
  model's parameters all live on one mesh and ``clip_grad_norm_``, optimizers and DCP see uniform
  DTensors;
* under sequence parallelism the residual stream between blocks is a DTensor sharded on the
  sequence dim (also when the length does not divide the TP size: DTensor tracks uneven shards).

Fused projections (e.g. a ``qkv`` Linear whose rows are ``[q; k; v]``) use
:class:`FusedColwiseParallel`: the weight is *stored* ``Shard(0)`` of the unchanged global tensor
(so initialisation, ``full_tensor()``, state dicts and DCP resharding see the checkpoint layout) and
redistributed to ``_StridedShard(0, split_factor=chunks)`` (each rank ``[q_r; k_r; v_r]``) in
every forward: one all-gather of that weight per forward and a matching reduction of its gradient.
A bare ``_StridedShard`` parameter would avoid that traffic, but DCP cannot save it (its local
rows are not one contiguous block of the global tensor).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from openspeed.errors import ConfigError

# Set on a module whose logits come out as vocab-sharded DTensors (read by ``loss_context``).
_VOCAB_PARALLEL_ATTR = "_openspeed_vocab_parallel_logits"


# --------------------------------------------------------------------------------------------------
# Size checks
# --------------------------------------------------------------------------------------------------


def check_divisible(tp: int, sizes: Iterable[tuple[str, int]]) -> None:
    """Raise a one-line :class:`ConfigError` for the first ``(label, size)`` that ``tp`` does not divide."""
    for label, size in sizes:
        if size % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {label}={size}")


# --------------------------------------------------------------------------------------------------
# Parallel styles
# --------------------------------------------------------------------------------------------------


def _to_replicate(value: Any, mesh: DeviceMesh) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.is_floating_point():
        return DTensor.from_local(value, mesh, (Replicate(),), run_check=False)
    return value


def _to_local(value: Any) -> Any:
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, tuple):
        return tuple(_to_local(v) for v in value)
    return value


class ReplicateParallel(ParallelStyle):
    """Keep a module whole on every rank, with its parameters as ``Replicate`` DTensors.

    Plain floating-point positional inputs are taken as replicated (every rank holds the same
    value); outputs go back to plain tensors. For modules that are not split (norms, patch
    embeddings, small heads), so that every parameter lives on the TP mesh.
    """

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    def _partition_fn(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for p_name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                continue
            replicated = distribute_tensor(param, mesh, [Replicate()], src_data_rank=self.src_data_rank)
            module.register_parameter(p_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

    @staticmethod
    def _prepare_input_fn(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(_to_replicate(value, mesh) for value in inputs)

    def _prepare_output_fn(self, mod: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
        return _to_local(outputs) if self.use_local_output else outputs

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, self._partition_fn, self._prepare_input_fn, self._prepare_output_fn
        )


def _fused_colwise_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    placements = (_StridedShard(0, split_factor=self._openspeed_fused_chunks),)
    weight = self.weight.redistribute(placements=placements)
    bias = None if self.bias is None else self.bias.redistribute(placements=placements)
    return F.linear(x, weight, bias)


class FusedColwiseParallel(ColwiseParallel):
    """Column parallelism for a Linear whose output is ``chunks`` equal blocks (e.g. fused ``[q; k; v]``).

    Every rank computes its share of *each* block: the local output is ``[block_0 shard r, ...,
    block_{chunks-1} shard r]`` on the last dim, i.e. for ``qkv`` the local heads' q, k and v. The
    parameters are stored ``Shard(0)`` of the unchanged global (checkpoint-layout) tensor; see the
    module docstring for why they are redistributed per forward instead of stored strided.
    """

    def __init__(self, chunks: int, *, input_layouts=None) -> None:
        super().__init__(input_layouts=input_layouts)
        self.chunks = chunks

    @staticmethod
    def _local_output_fn(mod: nn.Module, outputs: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        return outputs.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError("FusedColwiseParallel only supports nn.Linear")
        if module.out_features % (self.chunks * device_mesh.size()):
            raise ConfigError(
                f"parallel.tp={device_mesh.size()} does not divide the {self.chunks} blocks of "
                f"a fused projection with {module.out_features} outputs"
            )
        module._openspeed_fused_chunks = self.chunks
        # Instance-level forward: the module class (and so its other instances) is untouched.
        module.forward = types.MethodType(_fused_colwise_forward, module)

        def input_fn(mod, inputs, mesh):
            return ColwiseParallel._prepare_input_fn(
                self.input_layouts, self.desired_input_layouts, mod, inputs, mesh
            )

        return distribute_module(
            module, device_mesh, self._partition_linear_fn, input_fn, self._local_output_fn
        )


def vocab_parallel_embedding(output_layout=None) -> RowwiseParallel:
    """Row parallelism on ``nn.Embedding``: each rank holds a vocabulary slice, outputs are summed.

    ``output_layout`` defaults to ``Replicate()`` (a plain full tensor on every rank); ``Shard(1)``
    starts a sequence-parallel region right at the embedding (the output then stays a DTensor, which
    keeps track of uneven sequence shards).
    """
    layout = output_layout or Replicate()
    return RowwiseParallel(
        input_layouts=Replicate(), output_layouts=layout, use_local_output=not layout.is_shard()
    )


def vocab_parallel_head(input_layout=None) -> ColwiseParallel:
    """Column parallelism on an LM head, logits left as a DTensor sharded on the vocabulary (last dim).

    ``input_layout``: ``Replicate()`` (default) or ``Shard(1)`` after a sequence-parallel norm.
    Compute the loss inside :func:`loss_context`; read logits through :func:`full_logits`.
    """
    return ColwiseParallel(
        input_layouts=input_layout or Replicate(), output_layouts=Shard(-1), use_local_output=False
    )


def attention_plan(q: str, k: str, v: str, out: str, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Head-parallel attention: q/k/v column-parallel, ``out`` row-parallel (module names relative).

    Under sequence parallelism ``out`` reduce-scatters onto sequence shards (a Shard(1) DTensor);
    gather the block's input with :func:`gather_sequence_input`.
    """
    plan: dict[str, ParallelStyle] = {q: ColwiseParallel(), k: ColwiseParallel(), v: ColwiseParallel()}
    plan[out] = _row_out(sequence_parallel)
    return plan


def mlp_plan(gate: str | None, up: str, down: str, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Feed-forward: ``gate``/``up`` column-parallel, ``down`` row-parallel (names relative)."""
    plan: dict[str, ParallelStyle] = {up: ColwiseParallel(), down: _row_out(sequence_parallel)}
    if gate is not None:
        plan[gate] = ColwiseParallel()
    return plan


def _row_out(sequence_parallel: bool) -> RowwiseParallel:
    if sequence_parallel:
        return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    return RowwiseParallel()


def gather_sequence_input(num_args: int) -> PrepareModuleInput:
    """For the module after a sequence-parallel norm: its first arg goes Shard(1) -> plain full tensor."""
    rest = (None,) * (num_args - 1)
    return PrepareModuleInput(
        input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest), use_local_output=True
    )


def shard_sequence_input(num_args: int, gather_output: bool = False) -> ParallelStyle:
    """Enter the sequence-parallel region: a plain replicated first arg becomes a Shard(1) DTensor.

    An input that already is a DTensor (the previous block's output) passes through, so this can sit
    on every block of a stack: only the first one (of a model or of a pipeline stage) slices.
    ``gather_output``: leave the region after this block, its (single) output gathered back to a
    plain full tensor (e.g. the last block of a pipeline stage, whose output is sent to the next).
    """
    rest = (None,) * (num_args - 1)
    inputs = dict(input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest))
    if not gather_output:
        return PrepareModuleInput(**inputs, use_local_output=False)
    return PrepareModuleInputOutput(
        **inputs, use_local_input=False,
        output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True,
    )


def sequence_parallel_norm() -> SequenceParallel:
    """A norm computed on sequence shards, its output a Shard(1) DTensor."""
    return SequenceParallel()


def apply_plan(module: nn.Module, mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """``parallelize_module`` that keeps each parameter's ``requires_grad`` (frozen parts stay frozen).

    Some styles re-create parameters with ``requires_grad=True``; frozen flags set before the plan
    (``model.freeze``) are restored afterwards.
    """
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    parallelize_module(module, mesh, plan)
    for name, param in module.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Logits and loss
# --------------------------------------------------------------------------------------------------


def mark_vocab_parallel(module: nn.Module) -> None:
    """Record that ``module``'s logits are vocab-sharded DTensors (see :func:`loss_context`)."""
    setattr(module, _VOCAB_PARALLEL_ATTR, True)


def is_vocab_parallel(module: nn.Module) -> bool:
    return bool(getattr(module, _VOCAB_PARALLEL_ATTR, False))


def loss_context(model_or_logits: nn.Module | torch.Tensor | None):
    """``loss_parallel()`` when the logits are vocab-sharded DTensors, else a ``nullcontext``.

    Takes the model (as parallelized; checked with :func:`is_vocab_parallel`) or a logits tensor.
    Wrap the forward that computes the loss *and* its ``backward()`` in it.
    """
    if isinstance(model_or_logits, nn.Module):
        sharded = is_vocab_parallel(model_or_logits)
    else:
        sharded = isinstance(model_or_logits, DTensor) and any(
            p.is_shard() for p in model_or_logits.placements
        )
    return loss_parallel() if sharded else contextlib.nullcontext()


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with ``t``'s full value (gathers a DTensor; differentiable). Other tensors pass."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full (batch, seq, vocab) logits as a plain tensor, e.g. for greedy decoding.

    Vocab-sharded DTensor logits are all-gathered over the TP ranks (every TP rank must call this);
    plain tensors are returned unchanged.
    """
    return plain_tensor(logits)


def plain_loss_output(module: nn.Module, fields: tuple[str, ...] = ("loss",)) -> None:
    """Make ``module``'s output ``fields`` (attributes of its output object) plain tensors.

    A loss computed from DTensor logits is a (replicated) DTensor; the hook turns it into an ordinary
    scalar so callers can ``float()`` / sum it. Its backward still runs through the DTensor graph, so
    the ``backward()`` must stay inside :func:`loss_context`.
    """

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        for field in fields:
            value = getattr(output, field, None)
            if isinstance(value, DTensor):
                setattr(output, field, value.full_tensor())
        return output

    module.register_forward_hook(hook)
