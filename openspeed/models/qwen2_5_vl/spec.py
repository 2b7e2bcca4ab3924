"""Registers Qwen2.5-VL with the model registry."""

from __future__ import annotations

from openspeed.errors import ConfigError
from openspeed.models.qwen2_5_vl.config import HF_ARCHITECTURE, MODEL_TYPE, Qwen2_5_VLConfig
from openspeed.models.qwen2_5_vl.convert import hf_to_native, native_module_to_hf, native_to_hf
from openspeed.models.qwen2_5_vl.flops import training_flops
from openspeed.models.qwen2_5_vl.memory_plan import memory_plan
from openspeed.models.qwen2_5_vl.model import Qwen2_5_VLModel, reset_non_persistent_buffers
from openspeed.models.qwen2_5_vl.parallelize import parallelize
from openspeed.models.qwen2_5_vl.pipeline import (
    Qwen2_5_VLPipelinePacker,
    split_layers,
    stage_loss,
    stage_modules_for_rank,
)
from openspeed.models.registry import ModelSpec, PipelinePlan, register_model
from openspeed.tasks.vlm_sft import VLMTask


def init_std(config: Qwen2_5_VLConfig) -> float:
    """Default init std: the language model's ``initializer_range``."""
    return config.text.initializer_range


def set_rope_theta(config: Qwen2_5_VLConfig, theta: float) -> None:
    """Override the language model's RoPE base (the vision tower keeps its own)."""
    if not theta > 0:
        raise ConfigError(f"rope_theta must be positive, got {theta}")
    config.text.rope_theta = float(theta)


def part_of(name: str) -> str:
    """Freezable part of native parameter ``name``: ``vision``, ``merger`` or ``llm`` (incl. ``lm_head``)."""
    if name.startswith("visual.merger."):
        return "merger"
    if name.startswith("visual."):
        return "vision"
    return "llm"


def check_pipeline_split(config: Qwen2_5_VLConfig, num_stages: int, pipeline_num_layers) -> None:
    """One-line ``ConfigError`` when the decoder layers cannot be split as asked."""
    split_layers(config.text.num_hidden_layers, num_stages, pipeline_num_layers)


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
    reset_buffers=reset_non_persistent_buffers,
    init_std=init_std,
    set_rope_theta=set_rope_theta,
    part_of=part_of,
    parallelize=parallelize,
    pipeline=PipelinePlan(
        stage_modules=stage_modules_for_rank,
        packer=Qwen2_5_VLPipelinePacker,
        loss=stage_loss,
        check=check_pipeline_split,
    ),
    memory_plan=memory_plan,
    task=VLMTask,
    module_name_to_ref=native_module_to_hf,
)

register_model(QWEN2_5_VL_SPEC)
