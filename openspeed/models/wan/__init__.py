"""Wan2.1 DiT (text-to-video, image-to-video): native model, config, diffusers conversion, FLOPs.

The package itself is light (``family.py`` is read before torch is imported); the names below load
on first use.
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name in _EXPORTS:
        importlib.import_module("openspeed.models.wan.spec")  # registers the model type
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openspeed.models.wan' has no attribute '{name}'")


__all__ = sorted(_EXPORTS)
