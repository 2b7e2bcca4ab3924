"""Qwen2.5-VL: native model, config, checkpoint conversion, FLOPs and M-RoPE indexing.

The package itself is light (``family.py`` is read before torch is imported); the names below load
on first use.
"""

from __future__ import annotations

from openspeed.models.lazy import lazy_exports

_EXPORTS = {
    "Qwen2_5_VLConfig": "openspeed.models.qwen2_5_vl.config",
    "TextConfig": "openspeed.models.qwen2_5_vl.config",
    "VisionConfig": "openspeed.models.qwen2_5_vl.config",
    "hf_to_native": "openspeed.models.qwen2_5_vl.convert",
    "native_to_hf": "openspeed.models.qwen2_5_vl.convert",
    "flops_breakdown": "openspeed.models.qwen2_5_vl.flops",
    "training_flops": "openspeed.models.qwen2_5_vl.flops",
    "CausalLMOutput": "openspeed.models.qwen2_5_vl.model",
    "Qwen2_5_VLModel": "openspeed.models.qwen2_5_vl.model",
    "causal_lm_loss": "openspeed.models.qwen2_5_vl.model",
    "reset_non_persistent_buffers": "openspeed.models.qwen2_5_vl.model",
    "get_rope_index": "openspeed.models.qwen2_5_vl.rope_index",
    "mm_token_type_ids_from_input_ids": "openspeed.models.qwen2_5_vl.rope_index",
}


__getattr__ = lazy_exports(__name__, "openspeed.models.qwen2_5_vl.spec", _EXPORTS)

__all__ = sorted(_EXPORTS)
