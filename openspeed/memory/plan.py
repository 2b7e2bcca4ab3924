"""What the memory savers need to know about a model: its transformer layers and their parts.

A model family describes itself with a :class:`MemoryPlan` kept beside the model (for Qwen2.5-VL,
``openspeed/models/qwen2_5_vl/memory_plan.py``); the savers in this package read the plan and never
look at class names. All names are module paths relative to the model (or pipeline stage) the plan
was made for, as ``model.get_submodule`` takes them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from openspeed.errors import ConfigError

ROLES = ("layer", "attention", "mlp", "norm")


@dataclass(frozen=True)
class LayerParts:
    """One transformer layer and its parts.

    Attributes:
        name: module path of the layer (e.g. ``language_model.layers.3``).
        attention: path of its attention block, relative to the layer (``self_attn``), or ``None``.
        mlp: path of its feed-forward block, relative to the layer (``mlp``), or ``None``.
        norms: paths of its normalisation modules, relative to the layer.
    """

    name: str
    attention: str | None = None
    mlp: str | None = None
    norms: tuple[str, ...] = ()

    def part(self, role: str) -> list[str]:
        """Full module paths of this layer's parts in ``role`` (one of :data:`ROLES`)."""
        if role == "layer":
            return [self.name]
        if role == "attention":
            return [f"{self.name}.{self.attention}"] if self.attention else []
        if role == "mlp":
            return [f"{self.name}.{self.mlp}"] if self.mlp else []
        if role == "norm":
            return [f"{self.name}.{n}" for n in self.norms]
        raise ValueError(f"unknown layer part '{role}' (known: {', '.join(ROLES)})")


@dataclass(frozen=True)
class LayerStack:
    """A run of transformer layers applied one after the other (a vision tower, a decoder)."""

    name: str
    layers: tuple[LayerParts, ...]


@dataclass(frozen=True)
class MemoryPlan:
    """The layer stacks of a model (or of one pipeline stage), each in forward order."""

    stacks: tuple[LayerStack, ...]

    def layers(self) -> Iterator[LayerParts]:
        """Every layer of every stack, stack after stack, in forward order."""
        for stack in self.stacks:
            yield from stack.layers

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers()]

    def first_layers(self, num_layers: int | None) -> list[LayerParts]:
        """The first ``num_layers`` layers of each stack (all of them for ``None``).

        This is Megatron's ``recompute_method=block`` reading of ``recompute_num_layers``: counted per
        stack (vision tower and decoder each) and, under pipeline parallelism, per stage, since a
        stage's plan lists only the layers it holds.
        """
        if num_layers is None:
            return list(self.layers())
        if num_layers < 0:
            raise ConfigError(f"memory.recompute_num_layers: must not be negative, got {num_layers}")
        return [layer for stack in self.stacks for layer in stack.layers[:num_layers]]

    def select(self, patterns: list[str] | tuple[str, ...]) -> list[str]:
        """Module paths named by ``patterns``, in forward order without repeats.

        A pattern is a layer part (``layer``, ``attention``, ``mlp``, ``norm``), optionally qualified
        by a stack (``text.attention``, ``vision.mlp``), or a glob over module paths
        (``language_model.layers.*.self_attn``). A pattern that names nothing is a ``ConfigError``.
        """
        stacks = {stack.name: stack for stack in self.stacks}
        names: list[str] = []
        for pattern in patterns:
            stack_name, _, role = pattern.rpartition(".")
            found: list[str] = []
            if role in ROLES and (not stack_name or stack_name in stacks):
                chosen = [stacks[stack_name]] if stack_name else list(self.stacks)
                found = [path for stack in chosen for layer in stack.layers for path in layer.part(role)]
            else:
                every = [p for layer in self.layers() for r in ROLES for p in layer.part(r)]
                found = [p for p in every if fnmatch.fnmatchcase(p, pattern)]
            if not found:
                known = ", ".join([*ROLES, *(f"{s}.<part>" for s in stacks)])
                raise ConfigError(
                    f"memory.offload_activations: '{pattern}' names no module (use one of {known}, "
                    "or a glob over module paths such as language_model.layers.*.self_attn)"
                )
            names += [n for n in found if n not in names]
        return names


def resolve(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for each path in ``names``."""
    return [(name, model.get_submodule(name)) for name in names]
