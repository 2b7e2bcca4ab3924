"""Wan2.1 DiT (text-to-video, image-to-video): native model, config, diffusers conversion, FLOPs.

The package itself is light (``family.py`` is read before torch is imported); the names below load
on first use.
"""

from __future__ import annotations

from openspeed.models.lazy import lazy_exports

_EXPORTS = {
    "WanConfig": "openspeed.models.wan.config",
    "WanOutput": "openspeed.models.wan.model",
    "WanTransformer": "openspeed.models.wan.model",
    "reset_non_persistent_buffers": "openspeed.models.wan.model",
    "hf_to_native": "openspeed.models.wan.convert",
    "native_to_hf": "openspeed.models.wan.convert",
    "flops_breakdown": "openspeed.models.wan.flops",
    "training_flops": "openspeed.models.wan.flops",
}


__getattr__ = lazy_exports(__name__, "openspeed.models.wan.spec", _EXPORTS)

__all__ = sorted(_EXPORTS)
