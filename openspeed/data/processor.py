"""Tokenizer + Qwen2-VL image and video patching, and a native video loader.

transformers' combined ``Qwen2_5_VLProcessor`` and the Qwen2-VL *video* processor need torchvision,
which this project does not depend on. So ``VLProcessor`` composes the tokenizer with the settings of
the (PIL backend) image processor and patches images and videos itself, in exactly the image
processor's layout and values (tests compare the two). Patching natively is also several times
faster per image than calling the image processor, which matters when the data loader shares the
training process.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from openspeed.errors import BadSampleError, CheckpointError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width) for an image: multiples of ``factor``, area within [min, max] pixels.

    Same rule as the Qwen2-VL image processor, so images and video frames of the same size get
    the same grid.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has no pixels: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio above 200: {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image as the image processor's ``do_convert_rgb`` makes it.

    Transparency (an alpha band, or a palette / colour-key ``transparency``) is composited on a
    white background, as transformers' ``convert_to_rgb`` does; any other mode (L, I;16, I, F,
    CMYK, P, ...) goes through PIL's plain ``convert("RGB")``.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file as a viewer shows it: EXIF orientation applied, then :func:`to_rgb`.

    An animated file gives its first frame. Unusable files raise ``BadSampleError``:
    ``missing_file``; ``image_too_large`` above PIL's ``Image.MAX_IMAGE_PIXELS`` (checked before
    decoding; PIL itself only warns up to twice the limit); ``corrupt_media`` for a file that is
    empty, truncated or not an image.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadSampleError("missing_file", f"image not found: {path}")
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise BadSampleError(
                    "image_too_large", f"{path}: {im.width}x{im.height} is over {limit} pixels"
                )
            # Full decode now (exif_transpose loads and copies), so a truncated file fails here
            # rather than inside the model step.
            return to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        raise BadSampleError("image_too_large", f"{path}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSampleError("corrupt_media", f"unreadable image {path}: {e}") from e


def _natural_key(name: str) -> list[Any]:
    # "frame_10.png" sorts after "frame_9.png", as a person numbering frames expects.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _uniform_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (centre of each equal-length bin)."""
    if count >= total:
        return list(range(total))
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]


class VLProcessor:
    """Tokenizer plus Qwen2-VL image processing and native video processing.

    Build it with :meth:`from_pretrained` on a Hugging Face-format model directory.
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        ip = image_processor
        self.patch_size: int = int(ip.patch_size)
        self.temporal_patch_size: int = int(ip.temporal_patch_size)
        self._merge_size: int = int(ip.merge_size)
        size = ip.size
        self.min_pixels: int = int(size["shortest_edge"])
        self.max_pixels: int = int(size["longest_edge"])
        self.do_resize: bool = bool(ip.do_resize)
        self.resample = int(ip.resample) if ip.resample is not None else int(Image.Resampling.BICUBIC)
        self.do_rescale: bool = bool(ip.do_rescale)
        self.rescale_factor: float = float(ip.rescale_factor)
        self.do_normalize: bool = bool(ip.do_normalize)
        self.image_mean = np.asarray(ip.image_mean, dtype=np.float32)
        self.image_std = np.asarray(ip.image_std, dtype=np.float32)
        for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"):
            tid = tokenizer.convert_tokens_to_ids(name)
            if tid is None or tid == tokenizer.unk_token_id:
                raise CheckpointError(f"tokenizer has no {name} token")

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> VLProcessor:
        """Load the tokenizer and ``preprocessor_config.json`` settings from ``model_dir``.

        The directory's ``image_processor_type`` chooses the image side: the Qwen2-VL patching
        (Qwen2-VL, Qwen2.5-VL), or a fixed-size CLIP-style image with one placeholder token per
        feature (``LlavaImageProcessor``, ``CLIPImageProcessor``: :class:`ImageTokenProcessor`).
        """
        path = Path(model_dir)
        if not path.is_dir():
            raise CheckpointError(f"model directory not found: {path}")
        pre_cfg = path / "preprocessor_config.json"
        if not pre_cfg.is_file():
            raise CheckpointError(f"no preprocessor_config.json in {path}")
        try:
            settings = json.loads(pre_cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable {pre_cfg}: {e}") from e
        kind = str(settings.get("image_processor_type", "Qwen2VLImageProcessor")).removesuffix("Fast")
        kind = kind.removesuffix("Pil")
        if kind in ImageTokenProcessor.PROCESSORS:
            return ImageTokenProcessor.load(path, kind, settings)
        if kind != "Qwen2VLImageProcessor":
            known = ", ".join(sorted({"Qwen2VLImageProcessor", *ImageTokenProcessor.PROCESSORS}))
            raise CheckpointError(f"{pre_cfg}: image processor {kind} is not supported (known: {known})")
        from transformers import AutoTokenizer

        # The PIL backend is the Qwen2-VL image processor class that needs no torchvision.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        # Only pass keys the processor understands; hub files carry extras such as processor_class.
        keep = {
            "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "do_convert_rgb", "min_pixels", "max_pixels", "size", "patch_size",
            "temporal_patch_size", "merge_size",
        }  # fmt: skip
        kwargs = {k: v for k, v in settings.items() if k in keep}
        # Older hub files give min/max_pixels only, or a size dict in the other spelling.
        size = kwargs.get("size")
        if isinstance(size, dict) and "min_pixels" in size:
            kwargs["size"] = {"shortest_edge": size["min_pixels"], "longest_edge": size["max_pixels"]}
        try:
            image_processor = Qwen2VLImageProcessorPil(**kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot load processor from {path}: {e}") from e
        return cls(tokenizer, image_processor)

    # --- token ids -------------------------------------------------------------------------------

    def _token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def image_token_id(self) -> int:
        """Id of ``<|image_pad|>``, repeated once per merged image patch."""
        return self._token_id("<|image_pad|>")

    @property
    def video_token_id(self) -> int:
        """Id of ``<|video_pad|>``, repeated once per merged video patch."""
        return self._token_id("<|video_pad|>")

    @property
    def vision_start_id(self) -> int:
        """Id of ``<|vision_start|>``."""
        return self._token_id("<|vision_start|>")

    @property
    def vision_end_id(self) -> int:
        """Id of ``<|vision_end|>``."""
        return self._token_id("<|vision_end|>")

    @property
    def pad_token_id(self) -> int:
        """Padding id (``<|endoftext|>`` for Qwen tokenizers)."""
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self._token_id("<|endoftext|>"))

    @property
    def eos_token_id(self) -> int:
        """End-of-turn id (``<|im_end|>`` for Qwen chat tokenizers)."""
        eid = self.tokenizer.eos_token_id
        return int(eid if eid is not None else self._token_id("<|im_end|>"))

    @property
    def merge_size(self) -> int:
        """Spatial merge size: merge_size² patches become one LLM token."""
        return self._merge_size

    def num_tokens(self, grid_thw: torch.Tensor | list[int] | tuple[int, int, int]) -> int:
        """Placeholder tokens for one image/video grid: t*h*w / merge_size²."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self._merge_size**2)

    def image_placeholder(self, grid_thw) -> str:
        """The text an ``<image>`` tag of this grid becomes."""
        return "<|vision_start|>" + "<|image_pad|>" * self.num_tokens(grid_thw) + "<|vision_end|>"

    def video_placeholder(self, grid_thw) -> str:
        """The text a ``<video>`` tag of this grid becomes."""
        return "<|vision_start|>" + "<|video_pad|>" * self.num_tokens(grid_thw) + "<|vision_end|>"

    # --- images ----------------------------------------------------------------------------------

    def process_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch images exactly as the Qwen2-VL image processor does, without its per-call overhead.

        Each image is made RGB (:func:`to_rgb`), resized to its own ``smart_resize`` size, rescaled,
        normalised and repeated ``temporal_patch_size`` times (a one-frame "video"). Returns
        ``pixel_values`` float32 ``[sum(t*h*w), C*tp*p*p]`` and ``image_grid_thw`` long ``[n, 3]``;
        the values equal ``image_processor(images)``'s (a test holds them to it).
        """
        if not images:
            raise ValueError("process_images needs at least one image")
        parts, grids = [], []
        for image in images:
            frame = self._prepare_frame(image, self._target_size(image.height, image.width))
            flat, grid = self._patchify(frame[None])
            parts.append(flat)
            grids.append(grid)
        return torch.cat(parts), torch.cat(grids)

    def _target_size(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self._merge_size,
            min_pixels=self.min_pixels if min_pixels is None else min_pixels,
            max_pixels=self.max_pixels if max_pixels is None else max_pixels,
        )

    def _patchify(self, stack: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, C, H, W]`` normalised frames -> (``[t*h*w, C*tp*p*p]`` patches, ``[[t, h, w]]`` grid).

        The frame count is padded to a multiple of ``temporal_patch_size`` by repeating the last frame
        (so a single image is repeated ``temporal_patch_size`` times, as the image processor does).
        """
        p, m, tp = self.patch_size, self._merge_size, self.temporal_patch_size
        if stack.shape[0] % tp:
            pad = tp - stack.shape[0] % tp
            stack = np.concatenate([stack, np.repeat(stack[-1:], pad, axis=0)])
        t_total, channels, h, w = stack.shape
        if h % (p * m) or w % (p * m):
            raise ValueError(f"frame size {h}x{w} is not a multiple of patch*merge={p * m}")
        grid_t, grid_h, grid_w = t_total // tp, h // p, w // p
        patches = stack.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
        # -> (grid_t, gh/m, gw/m, m, m, C, tp, p, p): merge groups contiguous, as the image processor orders them.
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
        grid = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)
        return torch.from_numpy(np.ascontiguousarray(flat)), grid

    def _prepare_frame(self, frame: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """One frame to a normalised float32 CHW array, with the image processor's exact steps."""
        frame = to_rgb(frame)
        if self.do_resize and frame.size != (size[1], size[0]):
            frame = frame.resize((size[1], size[0]), resample=self.resample)
        arr = np.asarray(frame)
        # Per channel, a lookup of the normalised value of each of the 256 byte values.
        table = self._value_table
        return np.stack([np.take(table[c], arr[:, :, c]) for c in range(arr.shape[2])])

    @functools.cached_property
    def _value_table(self) -> np.ndarray:
        """``[3, 256]`` float32: what rescaling and normalising maps each channel's byte value to.

        Computed with the image processor's exact steps (rescale in float64, then float32), so a
        lookup gives the same values as transforming every pixel.
        """
        arr = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
        if self.do_rescale:
            # Upcast before scaling and downcast after, as transformers' rescale does.
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            arr = arr.astype(np.float32)
        if self.do_normalize:
            arr = (arr - self.image_mean) / self.image_std
        return np.ascontiguousarray(arr.T, dtype=np.float32)

    # --- video -----------------------------------------------------------------------------------

    def process_video(
        self,
        frames: list[Image.Image] | np.ndarray,
        fps: float,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Patch a video natively, in the image processor's layout with a real temporal axis.

        ``frames`` is a list of PIL images or a uint8 array ``[T, H, W, C]``; ``fps`` is the rate
        of these (already sampled) frames. All frames are resized to the size ``smart_resize``
        gives the first frame, rescaled and normalised like images; the frame count is padded to
        a multiple of ``temporal_patch_size`` by repeating the last frame. Returns
        ``pixel_values_videos`` ``[t*h*w, C*tp*p*p]``, ``video_grid_thw`` ``[1, 3]`` and
        ``second_per_grid_t = temporal_patch_size / fps``.
        """
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4:
                raise ValueError(f"video array must be [T, H, W, C], got shape {frames.shape}")
            frames = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
        frames = list(frames)
        if not frames:
            raise ValueError("process_video needs at least one frame")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        width, height = frames[0].size
        size = self._target_size(height, width, min_pixels, max_pixels)
        flat, grid = self._patchify(np.stack([self._prepare_frame(f, size) for f in frames]))
        return flat, grid, self.temporal_patch_size / float(fps)

    def load_video(
        self,
        path: str | os.PathLike,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> tuple[list[Image.Image], float]:
        """Read a video file (PyAV) or a folder of frame images; return (RGB frames, their fps).

        Video file: with ``num_frames``, that many frames are sampled uniformly; otherwise with
        ``fps``, frames are taken at that rate (never above the native rate); otherwise all frames.
        Folder: image files sorted by name (numbers compared numerically) at ``fps`` frames per
        second (default 2.0); ``num_frames`` subsamples uniformly. ``max_frames`` caps the count
        by uniform subsampling. The returned fps is the effective rate of the returned frames.
        Frame images are read like image files (:func:`read_image`). Raises ``BadSampleError``
        (``missing_file``/``corrupt_media``/``image_too_large``) for unusable input.
        """
        p = Path(path)
        if p.is_dir():
            frames, out_fps = self._load_frame_folder(p, num_frames, fps)
        elif p.is_file():
            frames, out_fps = self._load_video_file(p, num_frames, fps)
        else:
            raise BadSampleError("missing_file", f"video not found: {p}")
        if max_frames is not None and len(frames) > max_frames:
            keep = _uniform_indices(len(frames), max_frames)
            out_fps = out_fps * len(keep) / len(frames)
            frames = [frames[i] for i in keep]
        return frames, out_fps

    def _load_frame_folder(
        self, folder: Path, num_frames: int | None, fps: float | None
    ) -> tuple[list[Image.Image], float]:
        names = sorted(
            (n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key
        )
        if not names:
            raise BadSampleError("missing_file", f"no image frames in folder {folder}")
        rate = 2.0 if fps is None else float(fps)
        if num_frames is not None and num_frames < len(names):
            keep = _uniform_indices(len(names), num_frames)
            rate = rate * len(keep) / len(names)
            names = [names[i] for i in keep]
        return [read_image(folder / name) for name in names], rate

    def _load_video_file(
        self, path: Path, num_frames: int | None, fps: float | None
    ) -> tuple[list[Image.Image], float]:
        import av

        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise BadSampleError("corrupt_media", f"no video stream in {path}")
                stream = container.streams.video[0]
                native = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
                total = int(stream.frames or 0)
            if total <= 0:
                # Container headers often lack the frame count; a decoding pass gives the true one.
                with av.open(str(path)) as container:
                    total = sum(1 for _ in container.decode(video=0))
            if total <= 0:
                raise BadSampleError("corrupt_media", f"no frames decoded from {path}")
            if num_frames is not None:
                keep = _uniform_indices(total, num_frames)
            elif fps is not None and fps < native:
                keep = _uniform_indices(total, max(1, round(total * fps / native)))
            else:
                keep = list(range(total))
            wanted = set(keep)
            # Only the kept frames are converted to images, so long clips do not fill memory.
            frames: list[Image.Image] = []
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        frames.append(frame.to_image())
        except BadSampleError:
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            raise BadSampleError("corrupt_media", f"cannot decode {path}: {e}") from e
        if not frames:
            raise BadSampleError("corrupt_media", f"no frames decoded from {path}")
        # A header count can overstate what decodes; rate follows what was actually kept.
        return frames, native * len(frames) / total


class ImageTokenProcessor(VLProcessor):
    """Tokenizer plus a fixed-size image processor whose images become a run of one placeholder
    token per vision feature (LLaVA).

    ``pixel_values`` rows are whole images, flattened channels-first (``[n, C*H*W]``), so batches
    concatenate as the Qwen-VL patches do; ``image_grid_thw`` is ``[1, 1, 1]`` per image (one row).
    The pixels are those of transformers' image processor (``LlavaImageProcessor`` pads each image to
    a square with the mean colour first; ``CLIPImageProcessor`` resizes the shortest edge and
    crops the centre). Videos are not taken: a sample with one is skipped.
    """

    PROCESSORS = ("LlavaImageProcessor", "CLIPImageProcessor")

    def __init__(self, tokenizer, image_processor, image_token: str, tokens_per_image: int):  # noqa: D107
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.tokens_per_image = int(tokens_per_image)
        self._merge_size = 1

    @classmethod
    def load(cls, path: Path, kind: str, settings: dict) -> ImageTokenProcessor:
        """Build from ``path``'s tokenizer, ``preprocessor_config.json`` (``settings``) and the
        ``config.json`` that says which token stands for an image and how many features it gives."""
        from transformers import AutoTokenizer

        if kind == "LlavaImageProcessor":
            from transformers.models.llava.image_processing_pil_llava import (
                LlavaImageProcessorPil as Processor,
            )
        else:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
        keep = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad"}
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            vision = config["vision_config"]
            image_token_id = int(config.get("image_token_index", config.get("image_token_id")))
            side = int(vision["image_size"]) // int(vision["patch_size"])
            tokens = side * side + (config.get("vision_feature_select_strategy", "default") == "full")
            image_processor = Processor(**{k: v for k, v in settings.items() if k in keep})
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot load processor from {path}: {e}") from e
        crop = image_processor.crop_size
        crop = (int(crop.height), int(crop.width)) if hasattr(crop, "height") else (int(crop), int(crop))
        if crop != (int(vision["image_size"]),) * 2:
            raise CheckpointError(f"{path}: the image processor crops {crop[0]}x{crop[1]} but the vision tower "
                                  f"takes {vision['image_size']}x{vision['image_size']}")
        token = tokenizer.convert_ids_to_tokens(image_token_id)
        if token is None or tokenizer.convert_tokens_to_ids(token) != image_token_id:
            raise CheckpointError(f"{path}: the tokenizer has no token with the image id {image_token_id}")
        return cls(tokenizer, image_processor, token, tokens)

    @property
    def image_token_id(self) -> int:
        return self._token_id(self.image_token)

    @property
    def video_token_id(self) -> int:
        """No video token: -1 matches no id."""
        return -1

    def num_tokens(self, grid_thw) -> int:
        return self.tokens_per_image

    def image_placeholder(self, grid_thw) -> str:
        return self.image_token * self.tokens_per_image

    def video_placeholder(self, grid_thw) -> str:
        raise ValueError("this model takes no videos")

    def process_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` float32 ``[n, C*H*W]`` (transformers' processor's values, flattened) and
        ``image_grid_thw`` ``[n, 3]`` of ones."""
        if not images:
            raise ValueError("process_images needs at least one image")
        pixels = self.image_processor([to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        return pixels.float().flatten(1), torch.ones(len(images), 3, dtype=torch.long)

    def process_video(self, frames, fps):
        raise ValueError("this model takes no videos")
