"""Which modules the memory savers have claimed, so recompute and offload can refuse bad nesting.

A module recomputed in backward drops the tensors saved inside it; offloading a module that lies
inside such a region would keep (and move) exactly what the checkpoint drops, so the two are checked
against each other when applied.
"""

from __future__ import annotations

import weakref

from torch import nn

recomputed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
offloaded: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def strict_descendants(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if m is not module]
