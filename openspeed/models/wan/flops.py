"""Analytic training FLOPs of the Wan DiT (matmuls, convolution and attention; elementwise ops ignored).

Every matmul of an ``(m, k) x (k, n)`` shape costs ``2*m*k*n`` FLOPs forward and twice that backward,
hence a training factor of 3. Attention costs ``2 * 2 * head_dim`` FLOPs per head per (query, key)
pair: ``QK^T`` and the product with ``V``. The count is exact for the model's forward: it equals what
``torch.utils.flop_counter.FlopCounterMode`` counts for one forward, times 3. The timestep MLP is
counted once per sample (one timestep per sample, as Wan2.1 trains).
"""

from __future__ import annotations

from collections.abc import Sequence

from openspeed.models.wan.config import TEXT_CONTEXT_LENGTH, WanConfig

TRAIN_FACTOR = 3  # backward costs two forwards


def _latent_shapes(latent_shape: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    shapes = list(latent_shape)
    if shapes and isinstance(shapes[0], int):
        shapes = [shapes]
    out = []
    for shape in shapes:
        if len(shape) != 3:
            raise ValueError(f"latent shape must be (frames, height, width), got {tuple(shape)}")
        out.append(tuple(int(s) for s in shape))
    return out


def flops_breakdown(
    config: WanConfig,
    num_text_tokens: int,
    latent_shape: Sequence[int] | Sequence[Sequence[int]],
    num_image_tokens: int = 0,
) -> dict[str, float]:
    """Training FLOPs (forward + backward) per component, summed over the samples.

    Args:
        config: model config.
        num_text_tokens: text-encoder tokens per sample (512 for the released models).
        latent_shape: ``(frames, height, width)`` of one latent, or a list of them (one per sample).
        num_image_tokens: CLIP image tokens per sample (I2V; 257 for Wan2.1 I2V), 0 otherwise.

    Returns:
        ``embed`` (patch, timestep, text and image embeddings), ``block_matmul``, ``self_attention``,
        ``cross_attention`` and ``head``.
    """
    d, ffn = config.hidden_size, config.ffn_dim
    p_t, p_h, p_w = config.patch_size
    context = num_image_tokens + num_text_tokens
    if config.has_image_kv:  # image tokens: all but the last 512 context tokens (see WanTransformer)
        image_kv = max(context - TEXT_CONTEXT_LENGTH, 0)
        text_kv = context - image_kv
    else:
        image_kv, text_kv = 0, context

    forward = dict.fromkeys(("embed", "block_matmul", "self_attention", "cross_attention", "head"), 0)
    for frames, height, width in _latent_shapes(latent_shape):
        seq = (frames // p_t) * (height // p_h) * (width // p_w)
        embed = seq * config.in_channels * config.patch_volume * d  # patch embedding (Conv3d)
        embed += config.freq_dim * d + d * d + d * 6 * d  # timestep MLP and its 6-way modulation
        embed += num_text_tokens * (config.text_dim * d + d * d)
        if config.image_dim is not None:
            embed += num_image_tokens * (config.image_dim * config.image_dim + config.image_dim * d)
        block = seq * (4 * d * d + 2 * d * d + 2 * d * ffn)  # self-attn q/k/v/o, cross q/o, FFN
        block += (text_kv + image_kv) * 2 * d * d  # cross-attention K/V of the context tokens
        forward["embed"] += 2 * embed
        forward["block_matmul"] += 2 * config.num_layers * block
        forward["self_attention"] += 4 * config.num_layers * seq * seq * d
        forward["cross_attention"] += 4 * config.num_layers * seq * (text_kv + image_kv) * d
        forward["head"] += 2 * seq * d * config.out_channels * config.patch_volume
    return {name: float(TRAIN_FACTOR * value) for name, value in forward.items()}


def training_flops(
    config: WanConfig,
    num_text_tokens: int,
    latent_shape: Sequence[int] | Sequence[Sequence[int]],
    num_image_tokens: int = 0,
) -> float:
    """Total training FLOPs of one step over the given samples; see :func:`flops_breakdown`."""
    return sum(flops_breakdown(config, num_text_tokens, latent_shape, num_image_tokens).values())
