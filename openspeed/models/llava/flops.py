"""Analytic training FLOPs of LLaVA (matmuls only, forward + backward = 3 x forward)."""

from __future__ import annotations

from collections.abc import Sequence

from openspeed.models.llava.config import LlavaConfig
from openspeed.models.qwen2_5_vl.flops import TRAIN_FACTOR, text_matmul_params


def flops_breakdown(
    config: LlavaConfig, num_text_tokens: int, num_images: int, llm_seq_lens: Sequence[int] | None = None
) -> dict[str, float]:
    """Training FLOPs per component for ``num_images`` images and ``num_text_tokens`` other LLM tokens.

    The CLIP tower runs up to its last selected layer on ``1 + patches`` tokens per image; the
    projector maps ``tokens_per_image`` features per image. ``llm_seq_lens`` as in Qwen2.5-VL's
    formula (the causal attention term; ``None``: one sequence).
    """
    t, v = config.text, config.vision
    llm_tokens = num_text_tokens + num_images * v.tokens_per_image
    if llm_seq_lens is None:
        llm_seq_lens = [llm_tokens]
    elif sum(llm_seq_lens) != llm_tokens:
        raise ValueError(f"llm_seq_lens add up to {sum(llm_seq_lens)}, expected {llm_tokens} LLM tokens")
    causal_pairs = sum(s * (s + 1) // 2 for s in llm_seq_lens)
    layers = max(v.feature_layers)
    tokens = v.num_patches + 1
    d = v.hidden_size
    per_layer = 4 * d * d + 2 * d * v.intermediate_size
    patch_embed = v.num_channels * v.patch_size**2 * d * v.num_patches
    projector = (d * len(v.feature_layers) + v.out_hidden_size) * v.out_hidden_size * v.tokens_per_image
    forward = {
        "llm_matmul": 2 * text_matmul_params(config) * llm_tokens,
        "llm_attention": 4 * causal_pairs * t.num_attention_heads * t.head_dim * t.num_hidden_layers,
        "vision_matmul": 2 * num_images * (patch_embed + layers * per_layer * tokens),
        "vision_attention": 4 * num_images * layers * tokens * tokens * d,
        "projector_matmul": 2 * num_images * projector,
    }
    return {name: float(TRAIN_FACTOR * value) for name, value in forward.items()}


def training_flops(
    config: LlavaConfig,
    num_text_tokens: int,
    image_grid_thw=None,
    video_grid_thw=None,
    llm_seq_lens: Sequence[int] | None = None,
) -> float:
    """Total training FLOPs (the shared VLM task's call: one ``image_grid_thw`` row per image, no
    videos); see :func:`flops_breakdown`."""
    num_images = 0 if image_grid_thw is None else len(image_grid_thw)
    return sum(flops_breakdown(config, num_text_tokens, num_images, llm_seq_lens).values())
