"""Conversation dataset in the MindSpeed-MM / LLaMA-Factory format, tokenised with Qwen's chat layout.

A data file is a JSON list or JSONL of records such as::

    {"messages": [{"role": "user", "content": "<image>What colour is the circle?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/0.png"], "videos": ["clips/0.mp4"]}

or the ShareGPT spelling ``{"conversations": [{"from": "human", "value": ...}, ...], "system": ...}``.
Media paths are relative to the data file. Each ``<image>``/``<video>`` tag becomes the processor's
placeholder run (Qwen-VL: ``<|vision_start|>`` + one pad token per merged patch + ``<|vision_end|>``;
LLaVA: one image token per feature). Labels are -100
except on assistant replies and their closing ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from openspeed.data.processor import VLProcessor, read_image, to_rgb
from openspeed.errors import BadSampleError, DataError

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class _BadLine:
    """Placeholder for a JSONL line that did not parse; keeps the line's index in the dataset."""

    __slots__ = ("lineno", "error")

    def __init__(self, lineno: int, error: str):
        self.lineno = lineno
        self.error = error


def _read_records(path: Path) -> list[Any]:
    """Parse a JSON list or JSONL file; bad JSONL lines become ``_BadLine`` entries."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from e
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {path} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise DataError(f"data file {path} must hold a JSON list of records")
        return data
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) are not records
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            records.append(_BadLine(lineno, str(e)))
    return records


def _content_to_text(content: Any) -> str:
    """Message content as text with ``<image>``/``<video>`` tags (accepts OpenAI-style part lists)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind == "image" or "image" in part or "image_url" in part:
                    parts.append(IMAGE_TAG)
                elif kind == "video" or "video" in part:
                    parts.append(VIDEO_TAG)
                elif "text" in part:
                    parts.append(str(part["text"]))
                else:
                    raise ValueError(f"unknown content part {part!r}")
            else:
                raise ValueError(f"unknown content part {part!r}")
        return "".join(parts)
    raise ValueError(f"content must be a string or a list, got {type(content).__name__}")


def normalize_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Turn a record into ``[{"role", "content"}]`` with roles system/user/assistant.

    Accepts ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) and an optional
    top-level ``system`` string. Raises ``ValueError`` describing what is wrong.
    """
    if "messages" in record:
        raw, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        raw, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise ValueError("record has neither 'messages' nor 'conversations'")
    if not isinstance(raw, list) or not raw:
        raise ValueError("conversation must be a non-empty list")
    messages: list[dict[str, str]] = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError("'system' must be a string")
        messages.append({"role": "system", "content": system})
    for turn in raw:
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ValueError(f"turn must have '{role_key}' and '{text_key}'")
        role = _SHAREGPT_ROLES.get(str(turn[role_key]))
        if role is None:
            raise ValueError(f"unknown role {turn[role_key]!r}")
        messages.append({"role": role, "content": _content_to_text(turn[text_key])})
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i != 0:
            raise ValueError("a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant reply")
    return messages


def render_conversation(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render messages in Qwen's ``<|im_start|>role\\n...<|im_end|>\\n`` layout.

    Inserts the default system turn when there is none (as Qwen's chat template does). Returns the
    text and the character spans ``[start, end)`` to train on: each assistant reply plus its
    ``<|im_end|>`` (the newline after it stays unlabelled, like the prompt).
    """
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]
    for msg in messages:
        head = f"<|im_start|>{msg['role']}\n"
        body = msg["content"] + "<|im_end|>"
        pieces += [head, body, "\n"]
        if msg["role"] == "assistant":
            start = pos + len(head)
            spans.append((start, start + len(body)))
        pos += len(head) + len(body) + 1
    return "".join(pieces), spans


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset of tokenised multimodal conversations.

    ``__getitem__`` returns ``input_ids``/``labels`` (1-D long) and the vision tensors
    (``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``,
    ``second_per_grid_ts``; None when absent). Unusable samples raise ``BadSampleError``.
    Videos are sampled at ``video_fps`` frames per second, at most ``video_max_frames`` frames.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        processor: VLProcessor,
        max_seq_len: int,
        *,
        media_root: str | os.PathLike | None = None,
        video_fps: float = 2.0,
        video_max_frames: int | None = 32,
    ):
        self.path = Path(path)
        self.processor = processor
        self.max_seq_len = int(max_seq_len)
        self.media_root = Path(media_root) if media_root is not None else self.path.parent
        self.video_fps = video_fps
        self.video_max_frames = video_max_frames
        self._records = _read_records(self.path)
        # Cached once: tag expansion and tokenisation run for every sample.

    def __len__(self) -> int:
        return len(self._records)

    def record(self, i: int) -> dict[str, Any]:
        """The raw record at index ``i`` (e.g. question and reference answer for evaluation)."""
        rec = self._records[i]
        if isinstance(rec, _BadLine):
            raise BadSampleError("malformed_record", f"line {rec.lineno} of {self.path}: {rec.error}")
        if not isinstance(rec, dict):
            raise BadSampleError("malformed_record", f"record {i} of {self.path} is not a JSON object")
        return rec

    def _media_list(self, rec: dict[str, Any], key: str, i: int) -> list[Path]:
        value = rec.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadSampleError("malformed_record", f"record {i}: '{key}' must be a list of paths")
        return [Path(v) if os.path.isabs(v) else self.media_root / v for v in value]

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.record(i)
        try:
            messages = normalize_messages(rec)
        except ValueError as e:
            raise BadSampleError("malformed_record", f"record {i} of {self.path}: {e}") from e
        image_paths = self._media_list(rec, "images", i)
        video_paths = self._media_list(rec, "videos", i)
        check_media_tags(messages, len(image_paths), len(video_paths), where=f"record {i}")
        images = [load_image(p) for p in image_paths]
        videos = [
            self.processor.load_video(vp, fps=self.video_fps, max_frames=self.video_max_frames)
            for vp in video_paths
        ]
        media = encode_media(self.processor, images, videos, where=f"record {i}")
        # Expand tags in order of appearance, image k taking image_grid_thw[k].
        expand_all_media_tags(messages, self.processor, media)

        text, spans = render_conversation(messages)
        input_ids, labels = self._tokenize_with_labels(text, spans)
        if len(input_ids) > self.max_seq_len:
            raise BadSampleError(
                "too_long", f"record {i}: {len(input_ids)} tokens > max_seq_len {self.max_seq_len}"
            )
        return {"input_ids": input_ids, "labels": labels, **media}

    def _tokenize_with_labels(
        self, text: str, spans: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise the whole rendered text once and label tokens that start inside a reply span.

        Tokenising the full string (not turn by turn) keeps the ids identical to
        ``apply_chat_template``; character offsets then map reply spans onto tokens.
        """
        enc = self.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offsets = enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        span_idx = 0
        for t, (start, _end) in enumerate(offsets):
            while span_idx < len(spans) and start >= spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(spans):
                break
            if start >= spans[span_idx][0]:
                labels[t] = ids[t]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def encode_media(
    processor: VLProcessor,
    images: list[Image.Image],
    videos: list[tuple[list[Image.Image], float]],
    where: str,
) -> dict[str, torch.Tensor | None]:
    """Patch images and videos (given as ``(frames, fps)``) into the model's vision inputs.

    Returns ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw`` and
    ``second_per_grid_ts`` (``None`` when there is no image / video). Media the processor rejects
    (an extreme aspect ratio, say) raise ``BadSampleError("corrupt_media")`` naming ``where``.
    """
    pixel_values = image_grid_thw = None
    if images:
        try:
            pixel_values, image_grid_thw = processor.process_images(images)
        except ValueError as e:
            raise BadSampleError("corrupt_media", f"{where}: {e}") from e
    pixel_values_videos = video_grid_thw = second_per_grid_ts = None
    if videos:
        parts, grids, seconds = [], [], []
        for k, (frames, fps) in enumerate(videos):
            try:
                pv, grid, spg = processor.process_video(list(frames), fps)
            except ValueError as e:
                raise BadSampleError("corrupt_media", f"{where}: video {k}: {e}") from e
            parts.append(pv)
            grids.append(grid)
            seconds.append(spg)
        pixel_values_videos = torch.cat(parts)
        video_grid_thw = torch.cat(grids)
        second_per_grid_ts = torch.tensor(seconds, dtype=torch.float32)
    return {
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
        "pixel_values_videos": pixel_values_videos,
        "video_grid_thw": video_grid_thw,
        "second_per_grid_ts": second_per_grid_ts,
    }


def expand_media_tags(
    content: str,
    processor: VLProcessor,
    image_grids: Iterator[list[int]],
    video_grids: Iterator[list[int]],
) -> str:
    """Replace each ``<image>``/``<video>`` tag by its vision placeholder run, in order of appearance.

    Tag ``k`` of a kind takes the next grid of that kind from the iterators (shared across messages,
    so the numbering runs through the whole conversation).
    """
    out: list[str] = []
    rest = content
    while rest:
        ii, vi = rest.find(IMAGE_TAG), rest.find(VIDEO_TAG)
        if ii < 0 and vi < 0:
            out.append(rest)
            break
        if vi < 0 or (0 <= ii < vi):
            out.append(rest[:ii])
            out.append(processor.image_placeholder(next(image_grids)))
            rest = rest[ii + len(IMAGE_TAG) :]
        else:
            out.append(rest[:vi])
            out.append(processor.video_placeholder(next(video_grids)))
            rest = rest[vi + len(VIDEO_TAG) :]
    return "".join(out)


def expand_all_media_tags(messages: list[dict[str, str]], processor: VLProcessor, media: dict) -> None:
    """Expand the tags of every message in place with the grids in ``media`` (see encode_media)."""
    grids = media["image_grid_thw"], media["video_grid_thw"]
    image_iter = iter(grids[0].tolist() if grids[0] is not None else [])
    video_iter = iter(grids[1].tolist() if grids[1] is not None else [])
    for msg in messages:
        msg["content"] = expand_media_tags(msg["content"], processor, image_iter, video_iter)


def check_media_tags(messages: list[dict[str, str]], num_images: int, num_videos: int, where: str) -> None:
    """One ``<image>`` / ``<video>`` tag per image / video, else ``BadSampleError("malformed_record")``."""
    n_image_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    n_video_tags = sum(m["content"].count(VIDEO_TAG) for m in messages)
    if n_image_tags != num_images or n_video_tags != num_videos:
        raise BadSampleError(
            "malformed_record",
            f"{where}: {n_image_tags} <image>/{n_video_tags} <video> tags for "
            f"{num_images} images/{num_videos} videos",
        )


def load_image(image: Image.Image | str | os.PathLike) -> Image.Image:
    """An RGB image from a PIL image or a path, as the model should see it.

    EXIF orientation is applied and transparency composited on white (``processor.read_image``,
    ``processor.to_rgb``); unusable files raise ``BadSampleError`` (``missing_file``,
    ``image_too_large``, ``corrupt_media``).
    """
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    return read_image(image)
