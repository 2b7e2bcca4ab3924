"""Checkpoint key conversion between Hugging Face Qwen2.5-VL and the native model.

Native names are the Hugging Face module names with the ``model.`` wrapper removed:
``visual.*``, ``language_model.*`` and ``lm_head.weight``. Tensors are passed through untouched, so
conversion is a name map (:func:`hf_name_map`), which lets a loader read one tensor or slice at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig

# (Hugging Face prefix, native prefix), most specific first. The transformers-5 layout nests both
# towers under "model."; older hub checkpoints keep "visual." at the top and the decoder directly
# under "model.".
_HF_TO_NATIVE_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("visual.", "visual."),
    ("model.", "language_model."),
)
_NATIVE_TO_HF_PREFIXES = (
    ("visual.", "model.visual."),
    ("language_model.", "model.language_model."),
)
_EMBED_KEY = "language_model.embed_tokens.weight"
_LM_HEAD_KEY = "lm_head.weight"


def _rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # unknown keys pass through so strict loading can name them


def hf_name_map(hf_names: Iterable[str], config: Qwen2_5_VLConfig) -> dict[str, str]:
    """``{native name: Hugging Face name}`` for a checkpoint holding ``hf_names`` (either key layout).

    Every native tensor is one checkpoint tensor, unchanged: this map is all a loader needs to read
    each weight (or its slice) on its own. With tied embeddings a missing ``lm_head.weight`` is read
    from the embedding matrix.
    """
    out: dict[str, str] = {}
    for key in hf_names:
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed, never loaded (some old exports saved it)
        out[_rename(key, _HF_TO_NATIVE_PREFIXES)] = key
    if config.tie_word_embeddings and _LM_HEAD_KEY not in out and _EMBED_KEY in out:
        out[_LM_HEAD_KEY] = out[_EMBED_KEY]
    return out


def hf_to_native(state_dict: dict[str, Any], config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """Rename a Hugging Face state dict (either key layout) to native names (see :func:`hf_name_map`)."""
    return {native: state_dict[key] for native, key in hf_name_map(state_dict, config).items()}


def native_module_to_hf(name: str) -> str:
    """The Hugging Face (transformers-5) name of native module ``name``, e.g. for peft ``target_modules``."""
    return _rename(name, _NATIVE_TO_HF_PREFIXES)


def native_to_hf(state_dict: dict[str, Any], config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """Rename a native state dict to the transformers-5 layout.

    With tied embeddings ``lm_head.weight`` is dropped, as ``save_pretrained`` does (safetensors cannot
    store two names for one buffer).
    """
    out = {}
    for key, value in state_dict.items():
        if key == _LM_HEAD_KEY and config.tie_word_embeddings:
            continue
        out[_rename(key, _NATIVE_TO_HF_PREFIXES)] = value
    return out
