"""Checkpoint key conversion between diffusers' ``WanTransformer3DModel`` and the native model.

Native names say what a weight does (``blocks.3.self_attn.q_proj.weight`` rather than
``blocks.3.attn1.to_q.weight``, ``time_modulation`` rather than ``condition_embedder.time_proj``).
Shapes are identical on both sides, so conversion is a pure rename (:func:`hf_name_map`); tensors are
passed through.

diffusers -> native (``N`` a block index)::

    patch_embedding                                    patch_embed
    condition_embedder.time_embedder.linear_1|2        time_embed.fc1|2
    condition_embedder.time_proj                       time_modulation
    condition_embedder.text_embedder.linear_1|2        text_embed.fc1|2
    condition_embedder.image_embedder.norm1|norm2      image_embed.norm_in|norm_out
    condition_embedder.image_embedder.ff.net.0.proj    image_embed.ffn.fc1
    condition_embedder.image_embedder.ff.net.2         image_embed.ffn.fc2
    condition_embedder.image_embedder.pos_embed        image_embed.pos_embed
    blocks.N.attn1.to_q|to_k|to_v|to_out.0             blocks.N.self_attn.q_proj|k_proj|v_proj|o_proj
    blocks.N.attn1.norm_q|norm_k                       blocks.N.self_attn.q_norm|k_norm
    blocks.N.attn2.* (same as attn1)                   blocks.N.cross_attn.*
    blocks.N.attn2.add_k_proj|add_v_proj               blocks.N.cross_attn.image_k_proj|image_v_proj
    blocks.N.attn2.norm_added_k                        blocks.N.cross_attn.image_k_norm
    blocks.N.norm2                                     blocks.N.cross_attn_norm
    blocks.N.ffn.net.0.proj|ffn.net.2                  blocks.N.ffn.fc1|fc2
    blocks.N.scale_shift_table                         blocks.N.modulation
    proj_out|scale_shift_table                         out_proj|out_modulation

``blocks.N.attn2.norm_added_q`` (in some exports, unused by diffusers too) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from openspeed.models.wan.config import WanConfig

# Module paths (their ``.weight`` / ``.bias`` follow) and bare parameters, diffusers -> native.
_TOP_MODULES = {
    "patch_embedding": "patch_embed",
    "condition_embedder.time_embedder.linear_1": "time_embed.fc1",
    "condition_embedder.time_embedder.linear_2": "time_embed.fc2",
    "condition_embedder.time_proj": "time_modulation",
    "condition_embedder.text_embedder.linear_1": "text_embed.fc1",
    "condition_embedder.text_embedder.linear_2": "text_embed.fc2",
    "condition_embedder.image_embedder.norm1": "image_embed.norm_in",
    "condition_embedder.image_embedder.ff.net.0.proj": "image_embed.ffn.fc1",
    "condition_embedder.image_embedder.ff.net.2": "image_embed.ffn.fc2",
    "condition_embedder.image_embedder.norm2": "image_embed.norm_out",
    "proj_out": "out_proj",
}
_TOP_PARAMS = {
    "scale_shift_table": "out_modulation",
    "condition_embedder.image_embedder.pos_embed": "image_embed.pos_embed",
}
_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "o_proj",
              "norm_q": "q_norm", "norm_k": "k_norm"}
_BLOCK_MODULES = {
    **{f"attn1.{old}": f"self_attn.{new}" for old, new in _ATTENTION.items()},
    **{f"attn2.{old}": f"cross_attn.{new}" for old, new in _ATTENTION.items()},
    "attn2.add_k_proj": "cross_attn.image_k_proj",
    "attn2.add_v_proj": "cross_attn.image_v_proj",
    "attn2.norm_added_k": "cross_attn.image_k_norm",
    "norm2": "cross_attn_norm",
    "ffn.net.0.proj": "ffn.fc1",
    "ffn.net.2": "ffn.fc2",
}
_BLOCK_PARAMS = {"scale_shift_table": "modulation"}

# Weights some exported checkpoints carry that the model never uses (diffusers ignores them too).
_UNUSED_DIFFUSERS_KEYS = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


def _rename(key: str, modules: dict[str, str], params: dict[str, str]) -> str:
    """Rename one key with a module-path table (``path.weight``) and a bare-parameter table."""
    if key in params:
        return params[key]
    path, _, leaf = key.rpartition(".")
    if path in modules:
        return f"{modules[path]}.{leaf}"
    return key  # unknown keys pass through so strict loading can name them


def _rename_key(key: str, top: tuple[dict, dict], block: tuple[dict, dict]) -> str:
    match = _BLOCK_KEY.match(key)
    if match:
        index, rest = match.groups()
        return f"blocks.{index}.{_rename(rest, *block)}"
    return _rename(key, *top)


_TO_NATIVE = ((_TOP_MODULES, _TOP_PARAMS), (_BLOCK_MODULES, _BLOCK_PARAMS))
_TO_DIFFUSERS = (
    (_invert(_TOP_MODULES), _invert(_TOP_PARAMS)),
    (_invert(_BLOCK_MODULES), _invert(_BLOCK_PARAMS)),
)


def hf_name_map(hf_names: Iterable[str], config: WanConfig) -> dict[str, str]:
    """``{native name: diffusers name}`` for a checkpoint holding ``hf_names``: what a loader reads
    each native weight (or its slice) from, one tensor at a time."""
    return {_rename_key(key, *_TO_NATIVE): key for key in hf_names if not _UNUSED_DIFFUSERS_KEYS.match(key)}


def hf_to_native(state_dict: dict[str, Any], config: WanConfig) -> dict[str, Any]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to native names (see :func:`hf_name_map`)."""
    return {native: state_dict[key] for native, key in hf_name_map(state_dict, config).items()}


def native_to_hf(state_dict: dict[str, Any], config: WanConfig) -> dict[str, Any]:
    """Rename a native state dict to diffusers ``WanTransformer3DModel`` names."""
    return {_rename_key(key, *_TO_DIFFUSERS): value for key, value in state_dict.items()}


def native_module_to_diffusers(name: str) -> str:
    """diffusers' name of a native module (``blocks.0.self_attn.q_proj`` -> ``blocks.0.attn1.to_q``)."""
    return _rename_key(f"{name}.weight", *_TO_DIFFUSERS).removesuffix(".weight")
