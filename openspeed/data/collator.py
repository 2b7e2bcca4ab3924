"""Batch collation for tokenised multimodal samples (right padding, concatenated vision inputs)."""

from __future__ import annotations

from typing import Any

import torch

from openspeed.errors import BadSampleError

IGNORE_INDEX = -100

_VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


class VLCollator:
    """Collate ``ConversationDataset`` samples into a model batch.

    Sequences are right-padded with ``pad_token_id`` to the longest in the batch, rounded up to
    ``pad_to_multiple_of`` but never past ``max_len`` (a sample longer than ``max_len`` raises
    ``BadSampleError("too_long")``; truncating would orphan image tokens). The batch holds
    ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding), ``mm_token_type_ids``
    (0 text, 1 image, 2 video) and, only when some sample has them, the vision tensors
    concatenated over the batch in sample order.
    """

    def __init__(
        self,
        pad_token_id: int,
        image_token_id: int,
        video_token_id: int,
        pad_to_multiple_of: int | None = None,
        max_len: int | None = None,
    ):
        self.pad_token_id = int(pad_token_id)
        self.image_token_id = int(image_token_id)
        self.video_token_id = int(video_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_len = max_len

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        """Build the batch; ``None`` entries (skipped samples) are dropped."""
        samples = [s for s in samples if s is not None]
        if not samples:
            raise ValueError("cannot collate an empty batch")
        lengths = [int(s["input_ids"].numel()) for s in samples]
        longest = max(lengths)
        if self.max_len is not None and longest > self.max_len:
            raise BadSampleError("too_long", f"sample of {longest} tokens > collator max_len {self.max_len}")
        target = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            target = (longest + m - 1) // m * m
            if self.max_len is not None:
                target = min(target, self.max_len)

        bsz = len(samples)
        input_ids = torch.full((bsz, target), self.pad_token_id, dtype=torch.long)
        labels = torch.full((bsz, target), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((bsz, target), dtype=torch.long)
        for b, (s, n) in enumerate(zip(samples, lengths, strict=True)):
            input_ids[b, :n] = s["input_ids"]
            labels[b, :n] = s["labels"]
            attention_mask[b, :n] = 1
        mm_token_type_ids = torch.zeros((bsz, target), dtype=torch.long)
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        mm_token_type_ids[input_ids == self.video_token_id] = 2
        # Padding is text even if pad_token_id happened to equal a vision token id.
        mm_token_type_ids[attention_mask == 0] = 0

        batch: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm_token_type_ids,
        }
        for key in _VISION_KEYS:
            parts = [s[key] for s in samples if s.get(key) is not None]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        return batch


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on: labels != -100 after the causal shift (``labels[:, 1:]``)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())
