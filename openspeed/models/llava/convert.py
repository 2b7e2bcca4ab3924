"""Checkpoint names between transformers' LLaVA and the native model.

Native names: ``visual.vision_tower.*`` (CLIP, without its ``vision_model.`` wrapper),
``visual.multi_modal_projector.*``, ``language_model.*`` (the Llama decoder without ``model.``) and
``lm_head.weight``. Two checkpoint layouts are read: transformers 5's (``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``) and the one the hub's
``llava-hf`` checkpoints were saved in (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``). Tensors pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# (checkpoint prefix, native prefix), most specific first.
_TO_NATIVE = (
    ("model.vision_tower.vision_model.", "visual.vision_tower."),
    ("model.vision_tower.", "visual.vision_tower."),
    ("model.multi_modal_projector.", "visual.multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("vision_tower.vision_model.", "visual.vision_tower."),
    ("vision_tower.", "visual.vision_tower."),
    ("multi_modal_projector.", "visual.multi_modal_projector."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "language_model."),
)
_TO_HF = (
    ("visual.vision_tower.", "model.vision_tower."),
    ("visual.multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.", "model.language_model."),
)
_EMBED_KEY = "language_model.embed_tokens.weight"
_LM_HEAD_KEY = "lm_head.weight"


def _rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown keys pass through so strict loading can name them


def hf_name_map(hf_names: Iterable[str], config) -> dict[str, str]:
    """``{native name: checkpoint name}`` for a checkpoint holding ``hf_names`` (either layout)."""
    out: dict[str, str] = {}
    for key in hf_names:
        if key.endswith("position_ids") or key.endswith("rotary_emb.inv_freq"):
            continue  # buffers some exports saved; recomputed
        out[_rename(key, _TO_NATIVE)] = key
    if config.tie_word_embeddings and _LM_HEAD_KEY not in out and _EMBED_KEY in out:
        out[_LM_HEAD_KEY] = out[_EMBED_KEY]
    return out


def hf_to_native(state_dict: dict[str, Any], config) -> dict[str, Any]:
    return {native: state_dict[key] for native, key in hf_name_map(state_dict, config).items()}


def native_module_to_hf(name: str) -> str:
    """transformers-5 name of native module ``name`` (peft ``target_modules``)."""
    return _rename(name, _TO_HF)


def native_to_hf(state_dict: dict[str, Any], config) -> dict[str, Any]:
    """The transformers-5 state dict (a tied ``lm_head.weight`` dropped, as ``save_pretrained`` does)."""
    return {
        _rename(key, _TO_HF): value
        for key, value in state_dict.items()
        if not (key == _LM_HEAD_KEY and config.tie_word_embeddings)
    }
