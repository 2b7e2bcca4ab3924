"""Extracted Wan features: VAE latents and caption embeddings computed once, read back for training.

``openspeed data extract-features CONFIG --out DIR`` runs the frozen VAE and text encoder of the run's
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
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from openspeed.errors import BadSampleError, ConfigError, DataError

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


def extract_features(cfg, out_dir: str | os.PathLike, shard_samples: int = 256,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """Encode the run's training videos and captions once into ``out_dir``; returns counts.

    Uses the same frame sampling, buckets, VAE mode and ``text_len`` as training with ``cfg``. Bad
    samples are skipped and counted by reason.
    """
    from openspeed.models.wan.task import WanFlowMatchingTask

    if is_features_index(cfg.data.train_path):
        raise ConfigError("data.train_path already points at extracted features")
    task = WanFlowMatchingTask(cfg, device=torch.device(device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("features-*.safetensors"):
        old.unlink()
    dataset = task.train_set
    shard: dict[str, torch.Tensor] = {}
    shard_id = 0
    lines: list[str] = []
    skipped: dict[str, int] = {}

    def flush() -> None:
        nonlocal shard, shard_id
        if shard:
            save_file(shard, str(out / f"features-{shard_id:05d}.safetensors"), metadata={"format": "pt"})
            shard, shard_id = {}, shard_id + 1

    for i in range(len(dataset)):
        try:
            encoded = task.encode_sample(dataset[i])
        except BadSampleError as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        key = str(i)
        for name in SAMPLE_KEYS:
            if encoded.get(name) is not None:
                shard[f"{key}.{name}"] = encoded[name].detach().to("cpu", torch.float32).contiguous()
        lines.append(json.dumps({"index": i, "caption": encoded["caption"],
                                 "shard": f"features-{shard_id:05d}.safetensors", "key": key}))
        if len(lines) % shard_samples == 0:
            flush()
    flush()
    save_file({"text": task.null_text().contiguous()}, str(out / NULL_TEXT), metadata={"format": "pt"})
    (out / FEATURES_INDEX).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    meta = {
        "format": FORMAT,
        "source": os.path.abspath(cfg.data.train_path),
        "pipeline": os.path.abspath(cfg.model.path),
        "vae": cfg.wan.vae,
        "text_len": cfg.wan.text_len,
        "video_buckets": list(cfg.wan.video_buckets),
        "frame_interval": cfg.wan.frame_interval,
        "image_to_video": task.image_to_video,
        "samples": len(lines),
        "skipped": skipped,
    }
    (out / FEATURES_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        print(f"skipped {sum(skipped.values())} samples ({reasons})", file=sys.stderr)
    return {"samples": len(lines), "skipped": sum(skipped.values()), "shards": shard_id, "out": str(out)}


__all__ = ["FeatureDataset", "extract_features", "is_features_index", "read_meta"]
