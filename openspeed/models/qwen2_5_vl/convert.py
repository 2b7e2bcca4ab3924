"""Checkpoint key conversion between Hugging Face Qwen2.5-VL and the native model.

Native names are the Hugging Face module names with the ``model.`` wrapper removed:
``visual.*``, ``language_model.*`` and ``lm_head.weight``. Tensors are passed through untouched, so
conversion is a name map (:func:`hf_name_map`), which lets a loader read one tensor or slice at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class PrefixNames:
    """A checkpoint naming that differs from the native one by prefixes only (the VLM families').

    ``to_native``: (checkpoint prefix, native prefix) pairs, most specific first (several checkpoint
    layouts may map to one native name); ``to_hf``: (native prefix, transformers-5 prefix) pairs;
    ``skip``: name endings of saved buffers that are recomputed, never loaded.
    """

    to_native: tuple[tuple[str, str], ...]
    to_hf: tuple[tuple[str, str], ...]
    skip: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def name_map(self, hf_names: Iterable[str], config) -> dict[str, str]:
        """``{native name: checkpoint name}`` for a checkpoint holding ``hf_names`` (any known layout).

        Every native tensor is one checkpoint tensor, unchanged: this map is all a loader needs to read
        each weight (or its slice) on its own. With tied embeddings a missing ``lm_head.weight`` is read
        from the embedding matrix.
        """
        out: dict[str, str] = {}
        for key in hf_names:
            if not key.endswith(self.skip):
                out[_rename(key, self.to_native)] = key
        if config.tie_word_embeddings and _LM_HEAD_KEY not in out and _EMBED_KEY in out:
            out[_LM_HEAD_KEY] = out[_EMBED_KEY]
        return out

    def hf_to_native(self, state_dict: dict[str, Any], config) -> dict[str, Any]:
        """Rename a checkpoint's state dict to native names (see :meth:`name_map`)."""
        return {native: state_dict[key] for native, key in self.name_map(state_dict, config).items()}

    def module_to_hf(self, name: str) -> str:
        """The transformers-5 name of native module ``name``, e.g. for peft ``target_modules``."""
        return _rename(name, self.to_hf)

    def native_to_hf(self, state_dict: dict[str, Any], config) -> dict[str, Any]:
        """Rename a native state dict to the transformers-5 layout.

        With tied embeddings ``lm_head.weight`` is dropped, as ``save_pretrained`` does (safetensors
        cannot store two names for one buffer).
        """
        return {
            _rename(key, self.to_hf): value
            for key, value in state_dict.items()
            if not (key == _LM_HEAD_KEY and config.tie_word_embeddings)
        }


def _rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # unknown keys pass through so strict loading can name them


NAMES = PrefixNames(_HF_TO_NATIVE_PREFIXES, _NATIVE_TO_HF_PREFIXES)
hf_name_map = NAMES.name_map
hf_to_native = NAMES.hf_to_native
native_module_to_hf = NAMES.module_to_hf
native_to_hf = NAMES.native_to_hf
