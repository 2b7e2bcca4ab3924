"""Extracted Wan features: VAE latents and caption embeddings computed once, read back for training.

``openspeed data extract-features CONFIG --out DIR`` (:mod:`openspeed.models.wan.extract`) runs the frozen VAE and text encoder of the run's
pipeline over its video-caption data once (MindSpeed-MM's feature-extraction flow) and writes::

    DIR/meta.json                    what was extracted (vae mode, text_len, image-to-video, source)
    DIR/index.jsonl                  one line per usable sample: {"index", "caption", "shard", "key"}
    DIR/features-00000.safetensors   "<key>.latent", "<key>.text" (+ "<key>.image", "<key>.condition")
    DIR/null_text.safetensors        the empty caption's embedding (caption dropout)

Training with ``data.train_path: DIR/index.jsonl`` reads these instead of decoding and encoding; the
per-sample noise, timestep and caption-dropout draws depend only on (seed, step, source index), so a
run from features takes the same first step as the run from raw videos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from openspeed.errors import BadSampleError, DataError

FEATURES_META = "meta.json"
FEATURES_INDEX = "index.jsonl"
NULL_TEXT = "null_text.safetensors"
FORMAT = "openspeed-wan-features"
SAMPLE_KEYS = ("latent", "text", "image", "condition")


def is_features_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the ``index.jsonl`` of an extracted-features folder."""
    path = Path(path)
    return path.name == FEATURES_INDEX and (path.parent / FEATURES_META).is_file()


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / FEATURES_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not an openspeed feature folder (format {meta.get('format')!r})")
    return meta


class FeatureDataset:
    """Samples of an extracted-features folder: ``{"index", "caption", "latent", "text", ...}`` tensors."""

    def __init__(self, index_path: str | os.PathLike) -> None:
        from openspeed.data.video_text import read_jsonl

        self.path = Path(index_path)
        self.folder = self.path.parent
        self.meta = read_meta(self.folder)
        self._records = read_jsonl(self.path)
        self._handles: dict[str, Any] = {}
        null = self.folder / NULL_TEXT
        if not null.is_file():
            raise DataError(f"feature folder {self.folder} has no {NULL_TEXT}")
        self.null_text = load_file(str(null))["text"]

    def __len__(self) -> int:
        return len(self._records)

    def _handle(self, shard: str):
        if shard not in self._handles:
            path = self.folder / shard
            if not path.is_file():
                raise BadSampleError("missing_file", f"feature shard not found: {path}")
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self._records[i]
        if isinstance(rec, Exception) or not isinstance(rec, dict) or "shard" not in rec or "key" not in rec:
            raise BadSampleError("malformed_record", f"record {i} of {self.path} is not a feature record")
        handle = self._handle(rec["shard"])
        names = set(handle.keys())
        sample: dict[str, Any] = {"index": int(rec.get("index", i)), "caption": rec.get("caption", "")}
        for key in SAMPLE_KEYS:
            name = f"{rec['key']}.{key}"
            if name in names:
                sample[key] = handle.get_tensor(name)
        if "latent" not in sample or "text" not in sample:
            raise BadSampleError("corrupt_media", f"record {i}: shard {rec['shard']} lacks its tensors")
        return sample


__all__ = ["FEATURES_INDEX", "FEATURES_META", "FORMAT", "NULL_TEXT", "SAMPLE_KEYS", "FeatureDataset", "is_features_index", "read_meta"]
