"""Which implementation the models' ops use: the run's optimization level (``train.optimization_level``).

* 0 — reference ops only (the plain PyTorch formulas every fast path is tested against);
* 1 — fused ops: RMSNorm, SwiGLU and rotary embeddings through their fast paths, the fused AdamW step;
* 2 — level 1 plus the algorithmic savers that suit the model: the loss is computed from the final
  hidden states in chunks (fused linear + cross-entropy), so the full logits are never kept.

The level is process-wide (one model is trained per process); the trainer sets it from the config
before building the model, and :func:`optimization_level_scope` sets it for a block (tests,
benchmarks). Every level computes the same values within float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

LEVELS = (0, 1, 2)
_level = 2


def set_optimization_level(level: int) -> None:
    """Use ``level`` (0, 1 or 2) from now on."""
    global _level
    if level not in LEVELS:
        raise ValueError(f"optimization level must be one of {LEVELS}, got {level!r}")
    _level = int(level)


def optimization_level() -> int:
    """The level in use."""
    return _level


def fused() -> bool:
    """Whether fused op paths are in use (level >= 1)."""
    return _level >= 1


def chunked_loss() -> bool:
    """Whether the LM loss is computed from hidden states in chunks, without full logits (level 2)."""
    return _level >= 2


@contextlib.contextmanager
def optimization_level_scope(level: int) -> Iterator[None]:
    """Run a block at ``level``, then restore the previous one."""
    previous = _level
    set_optimization_level(level)
    try:
        yield
    finally:
        set_optimization_level(previous)
