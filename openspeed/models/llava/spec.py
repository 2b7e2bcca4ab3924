"""Registers LLaVA with the model registry.

Its own: config, CLIP tower and projector, checkpoint names, FLOPs, the vision side's parallel and
memory plans. Shared with Qwen2.5-VL: the decoder and causal-LM wrapper (loss, packing, KV cache),
the pipeline cut and the VLM task.
"""

from __future__ import annotations

import dataclasses

from openspeed.models.llava.config import HF_ARCHITECTURE, MODEL_TYPE, LlavaConfig
from openspeed.models.llava.convert import hf_to_native, native_module_to_hf, native_to_hf
from openspeed.models.llava.flops import training_flops
from openspeed.models.llava.model import LlavaModel
from openspeed.models.llava.parallelize import memory_plan, parallelize
from openspeed.models.qwen2_5_vl.spec import QWEN2_5_VL_SPEC
from openspeed.models.registry import register_model


def part_of(name: str) -> str:
    """Freezable part of native parameter ``name``: ``vision``, ``projector`` or ``llm`` (incl. ``lm_head``)."""
    if name.startswith("visual.multi_modal_projector."):
        return "projector"
    if name.startswith("visual."):
        return "vision"
    return "llm"


LLAVA_SPEC = dataclasses.replace(
    QWEN2_5_VL_SPEC,
    name=MODEL_TYPE,
    hf_model_types=(MODEL_TYPE,),
    hf_architecture=HF_ARCHITECTURE,
    config_from_hf=LlavaConfig.from_hf_dict,
    config_to_hf=LlavaConfig.to_hf_dict,
    build=LlavaModel,
    hf_to_native=hf_to_native,
    native_to_hf=native_to_hf,
    flops=training_flops,
    part_of=part_of,
    parallelize=parallelize,
    memory_plan=memory_plan,
    module_name_to_ref=native_module_to_hf,
)

register_model(LLAVA_SPEC)
