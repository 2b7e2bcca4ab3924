"""LLaVA's parallel plan: the CLIP tower's and projector's tensor-parallel layout and memory plan,
over the decoder plan it shares with Qwen2.5-VL (``qwen2_5_vl/parallelize.py``).

Context parallelism splits the decoder's sequence; the vision side, a batch of whole images, runs
whole on every cp rank (each image is short: one tower pass per image).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from openspeed.distributed.tensor_parallel import ReplicateParallel, attention_plan, check_divisible, mlp_plan
from openspeed.memory.plan import LayerParts, LayerStack, MemoryPlan
from openspeed.models.qwen2_5_vl import parallelize as shared

TOWER = "visual.vision_tower"


def check_tensor_parallel_sizes(config, tp: int) -> None:
    """One-line :class:`ConfigError` naming the first split size that ``tp`` does not divide."""
    if tp <= 1:
        return
    text, vision = config.text, config.vision
    check_divisible(tp, (
        ("text num_attention_heads", text.num_attention_heads),
        ("text num_key_value_heads", text.num_key_value_heads),
        ("text intermediate_size", text.intermediate_size),
        ("text vocab_size", text.vocab_size),
        ("vision num_attention_heads", vision.num_attention_heads),
        ("vision intermediate_size", vision.intermediate_size),
        ("text hidden_size (the projector's width)", text.hidden_size),
    ))


def vision_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """CLIP layers split by heads and MLP width, the projector column then row; the rest replicated."""
    if getattr(model, "visual", None) is None:
        return {}  # a pipeline stage without the vision side
    plan: dict[str, ParallelStyle] = {
        f"{TOWER}.embeddings": ReplicateParallel(),
        f"{TOWER}.pre_layrnorm": ReplicateParallel(),
        f"{TOWER}.post_layernorm": ReplicateParallel(),
    }
    for i in range(len(model.visual.vision_tower.encoder.layers)):  # every layer, run or not
        layer = f"{TOWER}.encoder.layers.{i}"
        plan[f"{layer}.layer_norm1"] = ReplicateParallel()
        plan[f"{layer}.layer_norm2"] = ReplicateParallel()
        for name, style in attention_plan("q_proj", "k_proj", "v_proj", "out_proj", sequence_parallel=False).items():
            plan[f"{layer}.self_attn.{name}"] = style
        for name, style in mlp_plan(None, "fc1", "fc2", sequence_parallel=False).items():
            plan[f"{layer}.mlp.{name}"] = style
    plan["visual.multi_modal_projector.linear_1"] = ColwiseParallel()
    plan["visual.multi_modal_projector.linear_2"] = RowwiseParallel()
    return plan


def memory_plan(model: nn.Module) -> MemoryPlan:
    """The CLIP layers, then the decoder layers, that ``model`` (or a pipeline stage) holds."""
    stacks = []
    visual = getattr(model, "visual", None)
    if visual is not None:
        stacks.append(LayerStack("vision", tuple(
            LayerParts(f"{TOWER}.encoder.layers.{i}", attention="self_attn", mlp="mlp",
                       norms=("layer_norm1", "layer_norm2"))
            for i, _ in visual.blocks.named_children()
        )))
    text = shared.memory_plan(model).stacks[-1]
    return MemoryPlan((*stacks, text))


parallelize = functools.partial(
    shared.parallelize, vision_plan=vision_plan, check=check_tensor_parallel_sizes, split_vision=False,
    memory=memory_plan,
)
