"""Vision-language supervised fine-tuning: conversations in, next-token loss on assistant replies."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from openspeed.config import RunConfig
from openspeed.errors import BadSampleError, DataError
from openspeed.tasks.samples import usable_samples

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
    "labels",
    "cu_seqlens",
)


class VLMTask:
    """Owns the processor, datasets and collator; turns sample indices into model batches."""

    def __init__(self, cfg: RunConfig):
        from openspeed.data.collator import VLCollator
        from openspeed.data.conversation import ConversationDataset
        from openspeed.data.processor import VLProcessor

        self.cfg = cfg
        self.processor = VLProcessor.from_pretrained(cfg.model.path)
        self.train_set = ConversationDataset(cfg.data.train_path, self.processor, cfg.data.max_seq_len)
        self.val_set = (
            ConversationDataset(cfg.data.val_path, self.processor, cfg.data.max_seq_len)
            if cfg.data.val_path
            else None
        )
        if len(self.train_set) == 0:
            raise DataError(f"data.train_path: no records in {cfg.data.train_path}")
        # data.packing: each micro-batch becomes one row of back-to-back samples with cu_seqlens
        # (see VLCollator); the model keeps attention, positions and targets inside each sample.
        self.collator = VLCollator(
            pad_token_id=self.processor.pad_token_id,
            image_token_id=self.processor.image_token_id,
            video_token_id=self.processor.video_token_id,
            packing=cfg.data.packing,
        )
        # Training samples that could not be used: index -> reason. Each bad sample counts once,
        # however many epochs meet it.
        self.skipped: dict[int, str] = {}
        self._fallback: dict[int, Any] = {}

    # ------------------------------------------------------------------ batches

    def _masked_fallback(self, dataset) -> dict[str, Any]:
        """A real sample with every label masked: keeps all ranks in lock-step, adds nothing to the loss."""
        key = id(dataset)
        if key not in self._fallback:
            for index in range(len(dataset)):
                try:
                    sample = dataset[index]
                except BadSampleError:
                    continue
                sample = dict(sample)
                sample["labels"] = torch.full_like(sample["labels"], -100)
                self._fallback[key] = sample
                break
            else:
                raise DataError("no usable sample in the data set: every record was skipped")
        return self._fallback[key]

    def load_batch(self, dataset, indices: list[int], skips: dict[int, str] | None = None) -> dict[str, Any]:
        """Collate the usable samples among ``indices``; bad ones are skipped (and noted in ``skips``)."""
        samples = usable_samples(dataset, indices, skips)
        if not samples:
            samples = [self._masked_fallback(dataset)]
        return self.collator(samples)

    @staticmethod
    def count_targets(batch: dict[str, Any]) -> int:
        """Loss tokens of the batch (padded or packed: a segment's first token is never a target)."""
        from openspeed.data.collator import count_label_tokens

        return count_label_tokens(batch)

    @staticmethod
    def flops(spec, config, batch: dict[str, Any]) -> float:
        """Analytic training FLOPs of one batch (vision tower + LLM, attention included; ``spec.flops``).

        Attention is counted over each sample's real tokens: the rows of a padded batch, the
        segments of a packed one.
        """
        mask = batch["attention_mask"]
        cu_seqlens = batch.get("cu_seqlens")
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            lengths = [int(mask[0, a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            lengths = mask.sum(dim=1).tolist()
        lengths = [n for n in lengths if n > 0]
        ids = batch["input_ids"][mask.bool()]
        placeholders = int(((ids == config.image_token_id) | (ids == config.video_token_id)).sum())
        return float(spec.flops(config, int(sum(lengths)) - placeholders, batch.get("image_grid_thw"),
                                batch.get("video_grid_thw"), lengths))

    @staticmethod
    def count_tokens(batch: dict[str, Any]) -> int:
        """Real (non-padding) tokens; a packed row's padding run has mask 0 too."""
        return int(batch["attention_mask"].sum())

    # ------------------------------------------------------------------ loss

    @staticmethod
    def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any], num_items: int) -> torch.Tensor:
        """Sum of this batch's token losses divided by the global target count ``num_items``."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        out = model(**inputs, num_items_in_batch=max(1, num_items), return_logits=False)
        return out.loss
