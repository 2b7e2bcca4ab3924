"""LLaVA as a model family: parts, LoRA defaults and the shapes demo data (read before torch)."""

from __future__ import annotations

from openspeed.models.families import Family, Generator, register_family
from openspeed.models.llava import commands

MODEL_TYPE = "llava"

# The decoder's attention and MLP projections and the CLIP layers' attention (q/k/v_proj match both
# towers; out_proj is CLIP's), not the projector or the LM head.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "self_attn.out_proj")

register_family(Family(
    name=MODEL_TYPE,
    model_types=(MODEL_TYPE,),
    spec_module="openspeed.models.llava.spec",
    # LLaVA's stage 1 trains the projector alone: model.freeze=[vision, llm].
    parts=("vision", "projector", "llm"),
    lora_targets=LORA_TARGETS,
    generators=(Generator("llava_shapes", commands.prepare_shapes, keys=commands.SHAPES_KEYS),),
    shapes_config=commands.shapes_config,
))
