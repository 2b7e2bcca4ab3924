"""``openspeed data extract-features``: encode a Wan run's videos and captions once (see
:mod:`openspeed.models.wan.features` for the folder it writes and how training reads it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from openspeed.errors import BadSampleError, ConfigError
from openspeed.models.wan.features import (
    FEATURES_INDEX,
    FEATURES_META,
    FORMAT,
    NULL_TEXT,
    SAMPLE_KEYS,
    is_features_index,
)


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



__all__ = ["extract_features"]
