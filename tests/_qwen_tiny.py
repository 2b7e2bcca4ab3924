"""Tiny Qwen2.5-VL fixtures shared by the equivalence tests: configs, a random HF model, batches."""

from __future__ import annotations

import torch

VOCAB = 200
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 190, 191, 192, 193
PAD_ID = 0
MERGE = 2
PATCH = 4
TEMPORAL_PATCH = 2
IN_CHANNELS = 3
PATCH_DIM = IN_CHANNELS * TEMPORAL_PATCH * PATCH * PATCH


def hf_config(tie_word_embeddings: bool = False):
    """A tiny ``transformers.Qwen2_5_VLConfig``.

    window_size 16 px = 2 merged tokens per window side, so every grid below is cut into several
    (sometimes partial) windows; blocks 1 and 3 use full attention.
    """
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=IN_CHANNELS,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL_PATCH,
            window_size=16,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
            tokens_per_second=2,
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tie_word_embeddings,
    )


def random_hf_model(tie_word_embeddings: bool = False, seed: int = 0):
    """A tiny fp32 HF model whose weights are re-drawn large enough for differences to show."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        hf_config(tie_word_embeddings), attn_implementation="sdpa", dtype=torch.float32
    )
    return perturb(model)


def perturb(model):
    """Re-draw a reference model's weights so no norm scale is 1 and no bias 0 (in place; eval mode)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or "ln_q" in name):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


def _text(gen: torch.Generator, n: int) -> list[int]:
    # Ordinary tokens only: stay clear of the pad id and the special ids at the top of the vocab.
    return torch.randint(3, 180, (n,), generator=gen).tolist()


def _merged_tokens(grid: list[int]) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def make_batch(samples: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
    """Build a right-padded batch.

    Each sample is a list of pieces: ``("text", n)`` prompt text, ``("answer", n)`` text that carries
    labels, ``("image", [t, h, w])`` or ``("video", [t, h, w], seconds_per_grid)``.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, label_rows = [], []
    image_grids, video_grids, seconds = [], [], []
    for pieces in samples:
        ids: list[int] = []
        labels: list[int] = []
        for piece in pieces:
            kind = piece[0]
            if kind in ("text", "answer"):
                tokens = _text(gen, piece[1])
                ids += tokens
                labels += tokens if kind == "answer" else [-100] * len(tokens)
                continue
            grid = piece[1]
            token = IMAGE_ID if kind == "image" else VIDEO_ID
            tokens = [VISION_START_ID] + [token] * _merged_tokens(grid) + [VISION_END_ID]
            ids += tokens
            labels += [-100] * len(tokens)
            if kind == "image":
                image_grids.append(grid)
            else:
                video_grids.append(grid)
                seconds.append(piece[2])
        rows.append(ids)
        label_rows.append(labels)

    length = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor([r + [PAD_ID] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (length - len(r)) for r in label_rows]),
    }
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (ids == IMAGE_ID).int() + 2 * (ids == VIDEO_ID).int()
    if image_grids:
        grid = torch.tensor(image_grids)
        batch["image_grid_thw"] = grid
        batch["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=gen)
    if video_grids:
        grid = torch.tensor(video_grids)
        batch["video_grid_thw"] = grid
        batch["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=gen)
        batch["second_per_grid_ts"] = torch.tensor(seconds)
    return batch


# Two images of different shapes in one sample (one with partial windows), one in the other.
IMAGE_BATCH = [
    [("text", 5), ("image", [1, 8, 12]), ("answer", 6)],
    [("text", 3), ("image", [1, 6, 10]), ("text", 2), ("image", [1, 4, 4]), ("answer", 5)],
]
# Videos with several temporal steps; 0.75 s/grid * 2 tokens/s = 1.5, truncated positions. The first
# sample also holds an image, so image and video grids are consumed side by side.
VIDEO_BATCH = [
    [("text", 2), ("image", [1, 4, 4]), ("text", 2), ("video", [3, 4, 6], 0.5), ("answer", 5)],
    [("text", 6), ("video", [2, 6, 8], 0.75), ("answer", 3)],
]
TEXT_BATCH = [
    [("text", 4), ("answer", 8)],
    [("text", 3), ("answer", 5)],
]


def native_config(tie_word_embeddings: bool = False):
    """The tiny model of :func:`hf_config` as a native config (no transformers import), pad id set."""
    from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig, TextConfig, VisionConfig

    text = TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        mrope_section=(2, 3, 3), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=PAD_ID,
    )
    vision = VisionConfig(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=IN_CHANNELS,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, window_size=16,
        out_hidden_size=64, fullatt_block_indexes=(1, 3), tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        vision=vision, text=text, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tie_word_embeddings,
    )
