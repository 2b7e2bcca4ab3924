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

    Padded mode (default): sequences are right-padded with ``pad_token_id`` to the longest in the
    batch, rounded up to ``pad_to_multiple_of`` but never past ``max_len``. The batch holds
    ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding), ``mm_token_type_ids``
    (0 text, 1 image, 2 video) and, only when some sample has them, the vision tensors
    concatenated over the batch in sample order.

    Packed mode (``packing=True``, MindSpeed's "EOD reset" layout): the samples are laid back to
    back in ONE row (batch of 1), with the same keys shaped ``(1, total)`` plus ``cu_seqlens``
    (int32) ``[0, l0, l0 + l1, ..., total]``. The row is right-padded to a multiple of
    ``pad_to_multiple_of``; that padding run, if any, is its own last segment (so
    ``cu_seqlens[-1] == total`` always), with ``attention_mask`` 0 and labels -100. The first label
    of every sample is set to -100, so no loss term predicts one sample's first token from the
    previous sample's last one (in the padded layout that token is never a target either, so both
    layouts have the same targets). A model given ``cu_seqlens`` keeps attention and M-RoPE
    positions inside each segment. ``max_len`` still bounds each sample, not the row: the row holds
    a whole micro-batch and may be longer than ``max_len``.

    In both modes a sample longer than ``max_len`` raises ``BadSampleError("too_long")``
    (truncating would orphan image tokens).
    """

    def __init__(
        self,
        pad_token_id: int,
        image_token_id: int,
        video_token_id: int,
        pad_to_multiple_of: int | None = None,
        max_len: int | None = None,
        packing: bool = False,
    ):
        self.pad_token_id = int(pad_token_id)
        self.image_token_id = int(image_token_id)
        self.video_token_id = int(video_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_len = max_len
        self.packing = bool(packing)

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        """Build the batch; ``None`` entries (skipped samples) are dropped."""
        samples = [s for s in samples if s is not None]
        if not samples:
            raise ValueError("cannot collate an empty batch")
        lengths = [int(s["input_ids"].numel()) for s in samples]
        longest = max(lengths)
        if self.max_len is not None and longest > self.max_len:
            raise BadSampleError("too_long", f"sample of {longest} tokens > collator max_len {self.max_len}")
        batch = self._pack(samples, lengths) if self.packing else self._pad(samples, lengths, longest)
        for key in _VISION_KEYS:
            parts = [s[key] for s in samples if s.get(key) is not None]
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        return batch

    def _round_up(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return (n + m - 1) // m * m if m else n

    def _pad(self, samples: list[dict[str, Any]], lengths: list[int], longest: int) -> dict[str, torch.Tensor]:
        """One row per sample, right-padded."""
        target = self._round_up(longest)
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
        return self._text_batch(input_ids, labels, attention_mask)

    def _pack(self, samples: list[dict[str, Any]], lengths: list[int]) -> dict[str, torch.Tensor]:
        """All samples back to back in one row; ``cu_seqlens`` marks where each starts."""
        real = sum(lengths)
        total = self._round_up(real)
        input_ids = torch.full((1, total), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, total), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((1, total), dtype=torch.long)
        attention_mask[0, :real] = 1
        bounds = [0]
        for s, n in zip(samples, lengths, strict=True):
            start = bounds[-1]
            input_ids[0, start : start + n] = s["input_ids"]
            labels[0, start : start + n] = s["labels"]
            if n:
                labels[0, start] = IGNORE_INDEX  # never predicted across the boundary
            bounds.append(start + n)
        if total > real:
            bounds.append(total)  # the padding run is a segment of its own
        batch = self._text_batch(input_ids, labels, attention_mask)
        batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        return batch

    def _text_batch(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        mm_token_type_ids = torch.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        mm_token_type_ids[input_ids == self.video_token_id] = 2
        # Padding is text even if pad_token_id happened to equal a vision token id.
        mm_token_type_ids[attention_mask == 0] = 0
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm_token_type_ids,
        }


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on: labels != -100 after the causal shift (``labels[:, 1:]``).

    For a packed batch (``cu_seqlens``) the first token of every segment is not a target either.
    """
    labels = batch["labels"]
    targets = labels[:, 1:] != IGNORE_INDEX
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None:
        starts = cu_seqlens[1:-1].long().to(labels.device)
        starts = starts[(starts > 0) & (starts < labels.shape[1])]
        targets[0, starts - 1] = False  # targets[t] is labels[t + 1]
    return int(targets.sum().item())
