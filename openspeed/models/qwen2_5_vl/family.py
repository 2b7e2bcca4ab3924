"""Qwen2.5-VL as a model family: parts, LoRA defaults and the shapes demo data (read before torch)."""

from __future__ import annotations

from openspeed.models.families import Family, Generator, register_family
from openspeed.models.qwen2_5_vl import commands

MODEL_TYPE = "qwen2_5_vl"

# The decoder's attention and MLP projections plus the vision blocks' attention and MLP (not the
# merger or the LM head).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "attn.qkv", "attn.proj")

register_family(Family(
    name=MODEL_TYPE,
    model_types=(MODEL_TYPE,),
    spec_module="openspeed.models.qwen2_5_vl.spec",
    parts=("vision", "merger", "llm"),
    lora_targets=LORA_TARGETS,
    generators=(Generator("shapes", commands.prepare_shapes, keys=commands.SHAPES_KEYS),),
    data_commands=(commands.SHAPES,),
    shapes_config=commands.shapes_config,
))
