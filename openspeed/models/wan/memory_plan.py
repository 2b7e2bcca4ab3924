"""The Wan DiT's blocks as the memory savers see them (``openspeed.memory``): one stack of transformer
blocks, each with its self-attention, feed-forward network and norms."""

from __future__ import annotations

from torch import nn

from openspeed.memory.plan import LayerParts, LayerStack, MemoryPlan


def memory_plan(model: nn.Module) -> MemoryPlan:
    """The ``blocks`` of a native Wan model (named by their index)."""
    layers = []
    for i, block in model.blocks.named_children():
        norms = ["self_attn_norm", "ffn_norm"]
        if not isinstance(block.cross_attn_norm, nn.Identity):
            norms.insert(1, "cross_attn_norm")
        layers.append(LayerParts(f"blocks.{i}", attention="self_attn", mlp="ffn", norms=tuple(norms)))
    return MemoryPlan((LayerStack("dit", tuple(layers)),))
