"""Checkpoint names between transformers' LLaVA and the native model.

Native names: ``visual.vision_tower.*`` (CLIP, without its ``vision_model.`` wrapper),
``visual.multi_modal_projector.*``, ``language_model.*`` (the Llama decoder without ``model.``) and
``lm_head.weight``. Two checkpoint layouts are read: transformers 5's (``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``) and the one the hub's
``llava-hf`` checkpoints were saved in (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``). Tensors pass through unchanged.
"""

from __future__ import annotations

from openspeed.models.qwen2_5_vl.convert import PrefixNames

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
NAMES = PrefixNames(_TO_NATIVE, _TO_HF, skip=("position_ids", "rotary_emb.inv_freq"))
hf_name_map = NAMES.name_map
hf_to_native = NAMES.hf_to_native
native_module_to_hf = NAMES.module_to_hf
native_to_hf = NAMES.native_to_hf
