"""Registers Qwen2.5-VL with the model registry."""

from __future__ import annotations

from openspeed.models.qwen2_5_vl.config import HF_ARCHITECTURE, MODEL_TYPE, Qwen2_5_VLConfig
from openspeed.models.qwen2_5_vl.convert import hf_to_native, native_to_hf
from openspeed.models.qwen2_5_vl.flops import training_flops
from openspeed.models.qwen2_5_vl.model import Qwen2_5_VLModel
from openspeed.models.registry import ModelSpec, register_model

QWEN2_5_VL_SPEC = ModelSpec(
    name=MODEL_TYPE,
    hf_model_types=(MODEL_TYPE,),
    hf_architecture=HF_ARCHITECTURE,
    config_from_hf=Qwen2_5_VLConfig.from_hf_dict,
    config_to_hf=Qwen2_5_VLConfig.to_hf_dict,
    build=Qwen2_5_VLModel,
    hf_to_native=hf_to_native,
    native_to_hf=native_to_hf,
    flops=training_flops,
)

register_model(QWEN2_5_VL_SPEC)
