"""Registers Qwen2-VL with the model registry.

Qwen2-VL shares Qwen2.5-VL's decoder, M-RoPE, checkpoint names, parallel plans (whose vision MLP
plan follows the block's layers), pipeline cut, memory plan, FLOPs formula and the VLM task; what
is its own is the config and the vision tower. So its spec is Qwen2.5-VL's with those replaced.
"""

from __future__ import annotations

import dataclasses

from openspeed.models.qwen2_5_vl.spec import QWEN2_5_VL_SPEC
from openspeed.models.qwen2_vl.config import HF_ARCHITECTURE, MODEL_TYPE, Qwen2VLConfig
from openspeed.models.qwen2_vl.model import Qwen2VLModel
from openspeed.models.registry import register_model

QWEN2_VL_SPEC = dataclasses.replace(
    QWEN2_5_VL_SPEC,
    name=MODEL_TYPE,
    hf_model_types=(MODEL_TYPE,),
    hf_architecture=HF_ARCHITECTURE,
    config_from_hf=Qwen2VLConfig.from_hf_dict,
    config_to_hf=Qwen2VLConfig.to_hf_dict,
    build=Qwen2VLModel,
)

register_model(QWEN2_VL_SPEC)
