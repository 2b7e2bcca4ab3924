"""LLaVA (1.5): CLIP vision tower, projector and Llama decoder.

The package itself is light (``family.py`` is read before torch is imported); the names below load
on first use.
"""

from __future__ import annotations

from openspeed.models.lazy import lazy_exports

_EXPORTS = {
    "LlavaConfig": "openspeed.models.llava.config",
    "LlavaModel": "openspeed.models.llava.model",
    "training_flops": "openspeed.models.llava.flops",
}

__getattr__ = lazy_exports(__name__, "openspeed.models.llava.spec", _EXPORTS)

__all__ = sorted(_EXPORTS)
