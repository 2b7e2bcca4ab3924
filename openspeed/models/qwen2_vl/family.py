"""Qwen2-VL as a model family: parts, LoRA defaults and the shapes demo data (read before torch)."""

from __future__ import annotations

from openspeed.models.families import Family, Generator, register_family
from openspeed.models.qwen2_5_vl.family import LORA_TARGETS
from openspeed.models.qwen2_vl import commands

MODEL_TYPE = "qwen2_vl"

register_family(Family(
    name=MODEL_TYPE,
    model_types=(MODEL_TYPE,),
    spec_module="openspeed.models.qwen2_vl.spec",
    parts=("vision", "merger", "llm"),
    # The decoder's attention and MLP projections plus the vision blocks' attention (as Qwen2.5-VL).
    lora_targets=LORA_TARGETS,
    generators=(Generator("qwen2_vl_shapes", commands.prepare_shapes, keys=commands.SHAPES_KEYS),),
    shapes_config=commands.shapes_config,
))
