"""``context_parallel_attention``: one attention call over a sequence split across a cp group.

Ulysses inside groups of ``U`` ranks (heads scattered, the group's sequence gathered), then ring attention
across the ``R`` groups; ``U = cp`` is pure Ulysses (a "ring" of one: one local attention), ``R = cp`` pure
ring (no all-to-all), anything between is the hybrid (USP). Masks come from global positions, packed
segment ids and the padding mask, so they are exact in every layout (see ``group.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from openspeed.distributed.context_parallel.blocks import BlockPlan, plan_block
from openspeed.distributed.context_parallel.group import ContextParallel
from openspeed.distributed.context_parallel.ring import RingAttention
from openspeed.distributed.context_parallel.ulysses import HeadsToSeq, SeqToHeads, head_plan


def _segment_ids(cu_seqlens: torch.Tensor, seq_len: int, batch: int) -> torch.Tensor:
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed sequence, got batch {batch}")
    bounds = cu_seqlens.to(device="cpu", dtype=torch.long)
    if bounds.dim() != 1 or bounds.numel() < 2 or bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens must run from 0 to the global sequence length {seq_len}, got {bounds.tolist()}"
        )
    if bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"cu_seqlens must not decrease, got {bounds.tolist()}")
    # Segment of position p: how many boundaries after the first are <= p.
    return torch.searchsorted(bounds[1:], torch.arange(seq_len), right=True)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cp: ContextParallel,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    plan: Any = None,
    _math: bool = False,
) -> torch.Tensor:
    """Attention of this rank's sequence shard against the whole (distributed) sequence.

    Equals ``F.scaled_dot_product_attention`` on the gathered global tensors, token for token, forward and
    backward.

    Args:
        q, k, v: ``(batch, heads, seq_local, head_dim)``, the tokens ``cp.local_indices(seq_global)`` in
            that order. ``k``/``v`` may have fewer heads (GQA: query head ``h`` reads kv head
            ``h // (Hq / Hkv)``).
        cp: the group, algorithm and layout.
        causal: a key is visible only at a global position <= the query's.
        attention_mask: LOCAL ``(batch, seq_local)``, 1 = real token, 0 = padding (same order as q).
            Padding keys are never attended to. A query that sees no key at all gets output 0.
        cu_seqlens: GLOBAL packed-sample boundaries ``[0, l0, l0 + l1, ..., seq_global]`` (batch 1);
            attention never crosses a boundary (causal applies within each sample).
        scale: softmax scale; ``head_dim ** -0.5`` when ``None``.
        plan: the forward's :class:`~openspeed.ops.attention.AttentionPlan` holding this
            ``attention_mask`` / ``cu_seqlens``: what they imply here (the gathered key mask, the
            segment ids, the head split and every ring step's block plan, with their host reads and
            the mask's all-gather) is then worked out by the forward's first call and reused by the
            later layers.

    Returns:
        The local shard of the output, shaped like ``q``.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            "q, k, v must be (batch, heads, seq, head_dim) with k and v alike, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, num_q_heads, local_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != local_len or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} outside the head dim")
    if num_q_heads % k.shape[1] != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    seq_len = local_len * cp.size
    cp.check_seq_len(seq_len)
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, local_len):
        raise ValueError(
            f"attention_mask must be the local (batch, seq_local) = {(batch, local_len)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if plan is not None and (plan.attention_mask is not attention_mask or plan.cu_seqlens is not cu_seqlens):
        raise ValueError("plan must hold this call's attention_mask and cu_seqlens")
    scale = head_dim**-0.5 if scale is None else scale

    # Everything below depends on the layout only, not on q/k/v: the same for every layer of a forward.
    key = ("context_parallel", cp, causal, batch, local_len, num_q_heads, k.shape[1], q.device)
    layout = None if plan is None else plan.cache.get(key)
    if layout is None:
        layout = _layout(cp, causal, batch, seq_len, num_q_heads, k.shape[1], attention_mask, cu_seqlens, q.device)
        if plan is not None:
            plan.cache[key] = layout
    heads, kv_index, plans = layout

    if heads is not None:
        q, k, v = SeqToHeads.apply(q, k, v, heads, cp.ulysses_group)
        if kv_index is not None:
            k, v = k.index_select(1, kv_index), v.index_select(1, kv_index)

    ring = cp.ring if cp.ring_size > 1 else None
    out = RingAttention.apply(q, k, v, ring, plans, scale, _math)

    if heads is not None:
        out = HeadsToSeq.apply(out, heads, cp.ulysses_group)
    return out


def _layout(
    cp: ContextParallel,
    causal: bool,
    batch: int,
    seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> tuple[Any, torch.Tensor | None, list[BlockPlan | None]]:
    """``(head plan or None, kv head index or None, block plan per ring step)`` of one layout."""
    segments = None if cu_seqlens is None else _segment_ids(cu_seqlens, seq_len, batch).to(device)
    key_valid = None if attention_mask is None else cp.gather_key_mask(attention_mask.to(device))

    heads, kv_index = None, None
    if cp.ulysses_size > 1:
        heads = head_plan(num_q_heads, num_kv_heads, cp.ulysses_size, cp.ulysses_rank)
        if heads.kv_index is not None:
            kv_index = heads.kv_index.to(device)

    q_pos = cp.group_positions(cp.ring_rank, seq_len).to(device)
    plans = []
    for step in range(cp.ring_size):
        source = (cp.ring_rank - step) % cp.ring_size
        k_pos = q_pos if step == 0 else cp.group_positions(source, seq_len).to(device)
        plans.append(
            plan_block(
                q_pos,
                k_pos,
                causal,
                None if segments is None else segments[q_pos],
                None if segments is None else segments[k_pos],
                None if key_valid is None else key_valid[:, k_pos],
            )
        )
    return heads, kv_index, plans
