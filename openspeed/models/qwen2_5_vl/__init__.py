"""Qwen2.5-VL: native model, config, checkpoint conversion, FLOPs and M-RoPE indexing."""

from openspeed.models.qwen2_5_vl import spec as _spec  # noqa: F401  (registers the model type)
from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from openspeed.models.qwen2_5_vl.convert import hf_to_native, native_to_hf
from openspeed.models.qwen2_5_vl.flops import flops_breakdown, training_flops
from openspeed.models.qwen2_5_vl.model import (
    CausalLMOutput,
    Qwen2_5_VLModel,
    causal_lm_loss,
    reset_non_persistent_buffers,
)
from openspeed.models.qwen2_5_vl.rope_index import get_rope_index, mm_token_type_ids_from_input_ids

__all__ = [
    "CausalLMOutput",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLModel",
    "TextConfig",
    "VisionConfig",
    "causal_lm_loss",
    "flops_breakdown",
    "get_rope_index",
    "hf_to_native",
    "mm_token_type_ids_from_input_ids",
    "native_to_hf",
    "reset_non_persistent_buffers",
    "training_flops",
]
