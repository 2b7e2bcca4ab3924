"""Wan2.1 DiT (text-to-video, image-to-video): native model, config, diffusers conversion, FLOPs."""

from openspeed.models.wan import spec as _spec  # noqa: F401  (registers the model type)
from openspeed.models.wan.config import WanConfig
from openspeed.models.wan.convert import hf_to_native, native_to_hf
from openspeed.models.wan.flops import flops_breakdown, training_flops
from openspeed.models.wan.model import WanOutput, WanTransformer, reset_non_persistent_buffers

__all__ = [
    "WanConfig",
    "WanOutput",
    "WanTransformer",
    "flops_breakdown",
    "hf_to_native",
    "native_to_hf",
    "reset_non_persistent_buffers",
    "training_flops",
]
