"""Qwen2-VL: native model and config; the rest is shared with Qwen2.5-VL.

The package itself is light (``family.py`` is read before torch is imported); the names below load
on first use.
"""

from __future__ import annotations

from openspeed.models.lazy import lazy_exports

_EXPORTS = {
    "Qwen2VLConfig": "openspeed.models.qwen2_vl.config",
    "Qwen2VLVisionConfig": "openspeed.models.qwen2_vl.config",
    "Qwen2VLModel": "openspeed.models.qwen2_vl.model",
}


__getattr__ = lazy_exports(__name__, "openspeed.models.qwen2_vl.spec", _EXPORTS)

__all__ = sorted(_EXPORTS)
