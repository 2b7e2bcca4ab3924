"""Analytic training FLOPs of Qwen2.5-VL and Qwen2-VL (matmuls only; norms, activations, softmax are ignored).

Every matmul of an ``(m, k) x (k, n)`` shape costs ``2*m*k*n`` FLOPs forward and twice that backward,
hence the factor ``3 * 2 = 6`` per weight per token for parameter matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from openspeed.models.qwen2_5_vl.model import vision_frame_cu_seqlens, vision_window_index

TRAIN_FACTOR = 3  # backward costs two forwards


def _grids(grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> torch.Tensor:
    if grid_thw is None:
        return torch.zeros(0, 3, dtype=torch.long)
    return torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3).cpu()


def _sum_squares(cu_seqlens: torch.Tensor) -> int:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return int((lengths * lengths).sum())


def text_matmul_params(config: Qwen2_5_VLConfig) -> int:
    """Weights that multiply every LLM token: attention and MLP projections of all layers plus ``lm_head``."""
    t = config.text
    q_dim = t.num_attention_heads * t.head_dim
    kv_dim = t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size


def vision_matmul_params(config: Qwen2_5_VLConfig) -> int:
    """Weights that multiply every vision patch: the patch embedding and all vision blocks."""
    v = config.vision
    per_block = 4 * v.hidden_size * v.hidden_size + v.mlp_matrices * v.hidden_size * v.intermediate_size
    return v.patch_dim * v.hidden_size + v.depth * per_block


def merger_matmul_params(config: Qwen2_5_VLConfig) -> int:
    """Weights that multiply every merged vision token (the merger MLP)."""
    v = config.vision
    merged = v.hidden_size * v.spatial_merge_size**2
    return merged * merged + merged * v.out_hidden_size


def flops_breakdown(
    config: Qwen2_5_VLConfig,
    num_text_tokens: int,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    llm_seq_lens: Sequence[int] | None = None,
) -> dict[str, float]:
    """Training FLOPs (forward + backward) per component.

    Args:
        config: model config.
        num_text_tokens: LLM tokens that are *not* image/video placeholders (the placeholders are
            added from the grids).
        image_grid_thw / video_grid_thw: (n, 3) patch grids, or ``None``.
        llm_seq_lens: lengths of the individual LLM sequences for the causal attention term; they
            must add up to all LLM tokens. ``None`` treats all tokens as a single sequence.

    Returns:
        ``llm_matmul``, ``llm_attention``, ``vision_matmul``, ``vision_attention``, ``merger_matmul``.
    """
    t, v = config.text, config.vision
    grids = torch.cat((_grids(image_grid_thw), _grids(video_grid_thw)))
    num_patches = int(grids.prod(-1).sum()) if len(grids) else 0
    num_merged = num_patches // v.spatial_merge_size**2
    llm_tokens = num_text_tokens + num_merged
    if llm_seq_lens is None:
        llm_seq_lens = [llm_tokens]
    elif sum(llm_seq_lens) != llm_tokens:
        raise ValueError(f"llm_seq_lens add up to {sum(llm_seq_lens)}, expected {llm_tokens} LLM tokens")

    # QK^T and attention-times-V: 2 * 2 * head_dim FLOPs per head per (query, key) pair.
    causal_pairs = sum(s * (s + 1) // 2 for s in llm_seq_lens)
    llm_attention = 4 * causal_pairs * t.num_attention_heads * t.head_dim * t.num_hidden_layers

    vision_attention = 0
    if num_patches:
        n_full = len(v.fullatt_block_indexes)
        pairs = n_full * _sum_squares(vision_frame_cu_seqlens(grids))
        if n_full < v.depth:  # the other blocks attend inside windows (Qwen2.5-VL)
            _, cu_windows = vision_window_index(grids, v.spatial_merge_size, v.window_size, v.patch_size)
            pairs += (v.depth - n_full) * _sum_squares(cu_windows)
        vision_attention = 4 * pairs * v.num_heads * v.head_dim

    forward = {
        "llm_matmul": 2 * text_matmul_params(config) * llm_tokens,
        "llm_attention": llm_attention,
        "vision_matmul": 2 * vision_matmul_params(config) * num_patches,
        "vision_attention": vision_attention,
        "merger_matmul": 2 * merger_matmul_params(config) * num_merged,
    }
    return {name: float(TRAIN_FACTOR * value) for name, value in forward.items()}


def training_flops(
    config: Qwen2_5_VLConfig,
    num_text_tokens: int,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    llm_seq_lens: Sequence[int] | None = None,
) -> float:
    """Total training FLOPs of one step over the given tokens; see :func:`flops_breakdown`."""
    return sum(
        flops_breakdown(config, num_text_tokens, image_grid_thw, video_grid_thw, llm_seq_lens).values()
    )
