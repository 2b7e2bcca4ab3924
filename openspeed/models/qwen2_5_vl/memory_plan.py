"""Qwen2.5-VL's layers as the memory savers see them (``openspeed.memory``): which modules are
transformer layers, and which of their parts are the attention, the MLP and the norms.

Works on the full model and on a pipeline stage (``pipeline.Qwen2_5_VLStage``), which holds only
some of the layers under their full-model names.
"""

from __future__ import annotations

from torch import nn

from openspeed.memory.plan import LayerParts, LayerStack, MemoryPlan


def memory_plan(model: nn.Module) -> MemoryPlan:
    """The vision blocks, then the decoder layers, that ``model`` (or a pipeline stage) holds."""
    stacks = []
    visual = getattr(model, "visual", None)
    if visual is not None:
        blocks = tuple(
            LayerParts(f"visual.blocks.{i}", attention="attn", mlp="mlp", norms=("norm1", "norm2"))
            for i, _ in visual.blocks.named_children()
        )
        stacks.append(LayerStack("vision", blocks))
    text = model.language_model
    # named_children: a pipeline stage's layers keep their full-model indices.
    layers = tuple(
        LayerParts(
            f"language_model.layers.{i}",
            attention="self_attn",
            mlp="mlp",
            norms=("input_layernorm", "post_attention_layernorm"),
        )
        for i, _ in text.layers.named_children()
    )
    stacks.append(LayerStack("text", layers))
    return MemoryPlan(tuple(stacks))
