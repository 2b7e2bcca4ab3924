"""Context parallelism applied to a model from outside, through module hooks.

A model stays plain: its parallel plan (beside the model) names which module's inputs are the
sequence to split and which modules' attention calls go through the cp algorithms, and these hooks
do the rest:

* :func:`shard_inputs` — a forward pre-hook that replaces named inputs by this rank's tokens
  (``ContextParallel.shard``), e.g. the decoder stack's embeddings, positions and padding mask.
* :func:`route_attention` — while the module runs, calls to the attention entry point
  (:func:`openspeed.ops.attention.attention`) are answered by :func:`context_parallel_attention`
  on the module's local shards (the backward keeps the cp group it was called with).
* :func:`suspended` — run a model as if it had no cp, every rank on the whole sequence (evaluation
  and decoding: each cp rank then computes the same thing).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

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
    stack: list[contextlib.ExitStack] = []

    def enter(mod: nn.Module, args: tuple) -> None:
        scope = contextlib.ExitStack()
        if not is_suspended():
            scope.enter_context(attention_ops.context_parallel_scope(cp))
        stack.append(scope)

    def leave(mod: nn.Module, args: tuple, output: Any) -> None:
        stack.pop().close()

    # always_call: the scope is left even when the forward raises.
    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ]
