"""Context parallelism applied to a model from outside, through module hooks.

A model stays plain: its parallel plan (beside the model) names which module's inputs are the
sequence to split and which modules' attention calls go through the cp algorithms, and these hooks
do the rest:

* :func:`shard_inputs` — a forward pre-hook that replaces named inputs by this rank's tokens
  (``ContextParallel.shard``), e.g. the decoder stack's embeddings, positions and padding mask.
* :func:`route_attention` — while the module runs, calls to the attention entry point
  (:func:`openspeed.ops.attention.attention`) are answered by :func:`context_parallel_attention`
  on the module's local shards (the backward keeps the cp group it was called with).
* :func:`split_packed_stack` — the same for a tower over one packed sequence (a vision tower's
  patches): its blocks run on this rank's tokens, attention through cp, and the tower's output is
  gathered back (with the gradients of every rank's use summed).
* :func:`suspended` — run a model as if it had no cp, every rank on the whole sequence (evaluation
  and decoding: each cp rank then computes the same thing).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from openspeed.distributed.comm import all_reduce
from openspeed.distributed.context_parallel.group import ContextParallel
from openspeed.ops import attention as attention_ops

_suspended = 0


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Inside this block cp hooks do nothing: models see and attend over the whole sequence."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def is_suspended() -> bool:
    """Whether a :func:`suspended` block is open."""
    return _suspended > 0


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All of a forward call's arguments by parameter name (defaults left out)."""
    return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)


def shard_inputs(
    module: nn.Module,
    cp: ContextParallel,
    dims: dict[str, int],
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> RemovableHandle:
    """Give ``module`` this rank's tokens of the inputs named in ``dims`` (name -> sequence dim).

    ``transform`` (optional) may rewrite the bound arguments first, on the whole sequence (e.g.
    turn ``labels`` into already-shifted targets before they are split). ``None`` inputs stay
    ``None``. The global sequence length must be a multiple of ``cp.seq_multiple``.
    """

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if is_suspended():
            return None
        bound = _bind(mod, args, kwargs)
        if transform is not None:
            bound = transform(bound)
        for name, dim in dims.items():
            value = bound.get(name)
            if value is not None:
                cp.check_seq_len(value.shape[dim])
                bound[name] = cp.shard(value, dim)
        return (), bound

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def route_attention(module: nn.Module, cp: ContextParallel) -> list[RemovableHandle]:
    """Make the attention calls made inside ``module`` context-parallel over ``cp``."""
    return _route_when(module, cp, lambda: True)


def _route_when(module: nn.Module, cp: ContextParallel, condition: Callable[[], bool]) -> list[RemovableHandle]:
    stack: list[contextlib.ExitStack] = []

    def enter(mod: nn.Module, args: tuple) -> None:
        scope = contextlib.ExitStack()
        if not is_suspended() and condition():
            scope.enter_context(attention_ops.context_parallel_scope(cp))
        stack.append(scope)

    def leave(mod: nn.Module, args: tuple, output: Any) -> None:
        stack.pop().close()

    # always_call: the scope is left even when the forward raises.
    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ]


class _GatherShared(torch.autograd.Function):
    """All-gather sequence shards for a tensor every rank then uses *differently* (e.g. vision
    features that each rank scatters into its own tokens): the backward sums the ranks' gradients
    before taking this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextParallel, dim: int) -> torch.Tensor:
        ctx.cp, ctx.dim = cp, dim
        return cp.gather(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        all_reduce(grad, group=ctx.cp.group)
        return ctx.cp.shard(grad, ctx.dim), None, None


def gather_shared(x: torch.Tensor, cp: ContextParallel, dim: int) -> torch.Tensor:
    """The whole sequence from every rank's shard of ``x``; gradients of all ranks' uses are summed."""
    return _GatherShared.apply(x, cp, dim)


def split_packed_stack(
    stack_owner: nn.Module,
    blocks: list[nn.Module],
    attention_modules: list[nn.Module],
    exit_module: nn.Module,
    cp: ContextParallel,
    total_len: Callable[[tuple, dict], int],
) -> None:
    """Run a stack of blocks over a packed sequence (dim 0) split across ``cp``, in place.

    For a tower whose blocks take ``(x, *per_token_tables, cu_seqlens)`` with ``x`` and the tables
    of the whole packed sequence (e.g. a vision tower over all images' patches): each block gets this
    rank's tokens of ``x`` (only the first block slices it; later ones receive the local output)
    and of every other tensor argument as long as the sequence, ``attention_modules`` attend
    through ``cp``, and ``exit_module`` (what follows the stack) gets the whole sequence back.
    ``total_len(args, kwargs)`` reads the packed length from ``stack_owner``'s inputs; a length the
    layout cannot split runs the stack unsplit (the same decision on every rank, as all see it).
    """
    state = {"active": False, "length": 0}

    def decide(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        length = int(total_len(args, kwargs))
        state["active"] = not is_suspended() and length % cp.seq_multiple == 0
        state["length"] = length

    def split(mod: nn.Module, args: tuple, kwargs: dict):
        if not state["active"]:
            return None
        bound = _bind(mod, args, kwargs)
        for name, value in bound.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == state["length"]:
                bound[name] = cp.shard(value, 0)
        return (), bound

    def join(mod: nn.Module, args: tuple, kwargs: dict):
        if not state["active"]:
            return None
        bound = _bind(mod, args, kwargs)
        first = next(iter(bound))
        bound[first] = gather_shared(bound[first], cp, 0)
        return (), bound

    stack_owner.register_forward_pre_hook(decide, with_kwargs=True)
    for block in blocks:
        block.register_forward_pre_hook(split, with_kwargs=True)
    for module in attention_modules:
        _route_when(module, cp, lambda: state["active"])
    exit_module.register_forward_pre_hook(join, with_kwargs=True)
