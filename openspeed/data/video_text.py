"""Video-caption pairs for text-to-video (and image-to-video) training, and video file writing.

Records are JSON lines ``{"video": PATH, "caption": TEXT}`` with an optional ``"first_frame": IMAGE``
(the image-to-video condition; without it the clip's own first frame is used). Relative paths are
taken relative to the JSONL file's folder.

Frames are decoded with PyAV from the start of the clip, every ``frame_interval``-th frame. Each clip
goes to one of the (frames, height, width) buckets: the one whose aspect ratio is closest to the
clip's among those it has enough frames for (larger buckets win ties); it is resized to cover the
bucket (aspect kept, bilinear with antialiasing) and centre-cropped. Unusable records raise
:class:`~openspeed.errors.BadSampleError` (``malformed_record``, ``missing_file``, ``corrupt_media``,
``too_short``): the task skips and counts them, as the VLM data does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from openspeed.errors import BadSampleError, ConfigError, DataError

Bucket = tuple[int, int, int]


def parse_buckets(values: Sequence[str], key: str = "video_buckets") -> list[Bucket]:
    """``["8x16x16", ...]`` -> ``[(8, 16, 16), ...]`` (frames x height x width); a ``ConfigError``
    naming the config ``key`` they came from if malformed."""
    buckets: list[Bucket] = []
    for value in values:
        parts = str(value).lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"{key}: '{value}' is not FRAMESxHEIGHTxWIDTH (e.g. 81x480x832)")
        buckets.append(tuple(int(p) for p in parts))  # type: ignore[arg-type]
    if not buckets:
        raise ConfigError(f"{key}: give at least one FRAMESxHEIGHTxWIDTH bucket")
    return buckets


def read_jsonl(path: str | Path) -> list[Any]:
    """Records of a JSONL file; a line that does not parse becomes an ``Exception`` placeholder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None
    records: list[Any] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            records.append(ValueError(f"line {lineno} of {path}: {exc}"))
    return records


def decode_frames(path: str | Path, max_frames: int, interval: int = 1) -> np.ndarray:
    """Up to ``max_frames`` RGB frames (n, H, W, 3) uint8: frames 0, interval, 2*interval, ... of a video file."""
    import av

    path = Path(path)
    if not path.is_file():
        raise BadSampleError("missing_file", f"video not found: {path}")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSampleError("corrupt_media", f"no video stream in {path}")
            for i, frame in enumerate(container.decode(video=0)):
                if i % interval == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == max_frames:
                        break
    except BadSampleError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise BadSampleError("corrupt_media", f"cannot decode {path}: {exc}") from None
    if not frames:
        raise BadSampleError("corrupt_media", f"no frames decoded from {path}")
    return np.stack(frames)


def choose_bucket(buckets: Sequence[Bucket], frames: int, height: int, width: int) -> Bucket | None:
    """The bucket for a clip of ``frames`` usable frames at ``height`` x ``width`` (``None``: too short)."""
    usable = [b for b in buckets if b[0] <= frames]
    if not usable:
        return None
    aspect = math.log(width / height)
    return min(usable, key=lambda b: (abs(math.log(b[2] / b[1]) - aspect), -b[0] * b[1] * b[2]))


def resize_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (frames, 3, H, W) float frames to cover ``height`` x ``width`` (aspect kept), centre-crop."""
    _, _, h, w = video.shape
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        video = F.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=True)
        top = (video.shape[2] - height) // 2
        left = (video.shape[3] - width) // 2
        video = video[:, :, top : top + height, left : left + width]
    return video


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [-1, 1]."""
    return torch.tensor(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_image(path: str | Path) -> Any:
    """An RGB PIL image, or ``BadSampleError``."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise BadSampleError("missing_file", f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadSampleError("corrupt_media", f"unreadable image {path}: {exc}") from None


def image_to_tensor(image: Any, height: int, width: int) -> torch.Tensor:
    """A PIL image -> (3, height, width) in [-1, 1], resized to cover and centre-cropped."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)[None]
    return resize_crop(to_model_range(array), height, width)[0]


class VideoTextDataset:
    """JSONL video-caption pairs as bucketed clips.

    ``dataset[i]`` is ``{"index", "caption", "video": (3, F, H, W) in [-1, 1], "first_frame": PIL
    image}``; ``first_frame`` is only there when ``image_to_video``.
    """

    def __init__(self, path: str | Path, buckets: Sequence[Bucket], frame_interval: int = 1,
                 image_to_video: bool = False) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.buckets = list(buckets)
        self.frame_interval = frame_interval
        self.image_to_video = image_to_video
        self._records = read_jsonl(self.path)
        self._max_frames = max(b[0] for b in self.buckets)

    def __len__(self) -> int:
        return len(self._records)

    def _path(self, value: str) -> Path:
        return Path(value) if os.path.isabs(value) else self.root / value

    def record(self, i: int) -> dict[str, Any]:
        """The validated record ``i`` (``video`` and ``caption`` strings)."""
        rec = self._records[i]
        if isinstance(rec, Exception):
            raise BadSampleError("malformed_record", str(rec))
        if not isinstance(rec, dict):
            raise BadSampleError("malformed_record", f"record {i} of {self.path} is not a JSON object")
        for key in ("video", "caption"):
            if not isinstance(rec.get(key), str):
                raise BadSampleError("malformed_record", f"record {i} of {self.path}: '{key}' must be a string")
        if "first_frame" in rec and not isinstance(rec["first_frame"], str):
            raise BadSampleError("malformed_record", f"record {i} of {self.path}: 'first_frame' must be a path")
        return rec

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.record(i)
        frames = decode_frames(self._path(rec["video"]), self._max_frames, self.frame_interval)
        n, h, w, _ = frames.shape
        bucket = choose_bucket(self.buckets, n, h, w)
        if bucket is None:
            need = (min(b[0] for b in self.buckets) - 1) * self.frame_interval + 1
            raise BadSampleError("too_short", f"record {i}: {rec['video']} has fewer than {need} frames")
        f, bh, bw = bucket
        video = resize_crop(to_model_range(frames[:f]), bh, bw).permute(1, 0, 2, 3).contiguous()
        sample = {"index": i, "caption": rec["caption"], "video": video}
        if self.image_to_video:
            if "first_frame" in rec:
                sample["first_frame"] = load_image(self._path(rec["first_frame"]))
            else:
                from PIL import Image

                sample["first_frame"] = Image.fromarray(frames[0])
        return sample


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, lossless: bool = False) -> Path:
    """Write (F, H, W, 3) uint8 frames; returns the path written.

    ``.mkv`` files are lossless FFV1; ``.mp4`` is H.264 (lossless RGB with ``lossless``), falling back
    to MPEG-4 Part 2, and to a GIF beside it (same name, ``.gif``) when PyAV has no usable encoder.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, height, width, _ = frames.shape
    if path.suffix == ".mkv":
        choices = [("ffv1", "bgr0", {})]
    elif path.suffix == ".gif":
        choices = []
    else:
        choices = [("libx264rgb", "rgb24", {"crf": "0", "preset": "ultrafast"})] if lossless else []
        if height % 2 == 0 and width % 2 == 0:
            choices.append(("libx264", "yuv420p", {"crf": "12", "preset": "medium"}))
        choices.append(("mpeg4", "yuv420p", {"qscale": "2"}))
    for codec, pix_fmt, options in choices:
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                stream.options = options
                for frame in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return path
        except (av.FFmpegError, ValueError, OSError):
            continue
    from PIL import Image

    gif = path.with_suffix(".gif")
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return gif


def write_contact_sheet(path: str | Path, frames: np.ndarray, scale: int = 4, columns: int | None = None) -> Path:
    """A PNG of the frames side by side (rows of ``columns``), each enlarged ``scale`` times (nearest)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, height, width, _ = frames.shape
    columns = columns or n
    rows = math.ceil(n / columns)
    gap = 2
    sheet = Image.new("RGB", (columns * (width * scale + gap) + gap, rows * (height * scale + gap) + gap),
                      (128, 128, 128))
    for k, frame in enumerate(frames):
        tile = Image.fromarray(frame).resize((width * scale, height * scale), Image.NEAREST)
        r, c = divmod(k, columns)
        sheet.paste(tile, (gap + c * (width * scale + gap), gap + r * (height * scale + gap)))
    sheet.save(path)
    return path


__all__ = [
    "Bucket",
    "VideoTextDataset",
    "choose_bucket",
    "decode_frames",
    "image_to_tensor",
    "load_image",
    "parse_buckets",
    "read_jsonl",
    "resize_crop",
    "to_model_range",
    "video_to_uint8",
    "write_contact_sheet",
    "write_video",
]
