"""The single attention entry point used by every native model.

Tensors are laid out ``(batch, heads, seq, head_dim)``. Keys/values may have fewer heads than queries
(grouped-query attention) as long as the query head count is a multiple of theirs; query head ``h``
reads key/value head ``h // (q_heads // kv_heads)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)

    # SDPA's fused kernels do not take a mask together with enable_gqa (it falls back to the slow
    # math path), so expand the kv heads instead.
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    q_len, k_len = q.shape[2], k.shape[2]
    allowed = key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Sk)
    if causal:
        tril = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril()
        allowed = allowed & tril
    # A query that may see no key at all (e.g. a left-padding query under causal masking) would give
    # 0/0 in the softmax on some backends; let it see every key instead. Its output is meaningless
    # but finite, and rows with at least one visible key are untouched.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; returns a tensor shaped like ``q``.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``; ``k``/``v`` may have fewer heads (GQA).
        causal: mask out keys after the query. Queries and keys are assumed to be the same positions
            (no KV cache), i.e. the mask is aligned top-left.
        attention_mask: ``(batch, seq)`` with 1 for real tokens and 0 for padding. Padding keys are
            never attended to; padding queries produce finite garbage.
        cu_seqlens: int cumulative segment lengths ``[0, l0, l0 + l1, ..., seq]`` for a batch of one
            packed sequence; attention never crosses a segment boundary (and ``causal`` applies within
            each segment).
        scale: softmax scale; ``head_dim ** -0.5`` when ``None``.
    """
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens is None:
        return _dense_attention(q, k, v, causal, attention_mask, scale)

    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed sequence, got batch {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[2]:
        raise ValueError(f"cu_seqlens must run from 0 to seq ({q.shape[2]}), got {bounds[0]}..{bounds[-1]}")
    # One SDPA call per segment: on CPU, for a few hundred tokens in windows of tens, this is several
    # times faster than a single call with a block-diagonal mask (the mask costs O(seq^2) work).
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        segment_mask = None if attention_mask is None else attention_mask[:, start:end]
        outputs.append(
            _dense_attention(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], causal, segment_mask, scale
            )
        )
    if not outputs:
        return torch.empty_like(q)
    return torch.cat(outputs, dim=2)
