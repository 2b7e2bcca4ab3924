"""Ulysses: all-to-all from (sequence shard, all heads) to (whole sequence, head shard) and back.

Heads are split as evenly as possible: with ``H`` heads over ``U`` ranks, rank ``j`` gets ``H // U`` heads
plus one more if ``j < H % U`` (unaligned Ulysses), contiguous and in order. Each rank must get at least
one query head.

Grouped-query attention: rank ``j`` receives exactly the key/value heads its query heads read
(``h // (Hq / Hkv)`` for each of its query heads ``h``). When ``Hkv`` is not a multiple of ``U`` (e.g. 2 kv
heads on 4 ranks) a kv head is sent to every rank that needs it, i.e. kv heads are duplicated no more
than needed; the backward sums the duplicates' gradients. If a rank's query heads do not map onto its
kv heads as a plain GQA group (possible with uneven splits), its kv heads are expanded to one per query
head locally (``index_select``, whose backward sums); under the hybrid the ring then carries the expanded
heads.

Both directions are one fused ``all_to_all_single`` (q, k and v travel together) inside custom autograd
Functions whose backward is the reverse all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from openspeed.distributed.context_parallel import comm
from openspeed.errors import ConfigError


def split_heads(num_heads: int, parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` head ranges of ``parts`` ranks: sizes differ by at most one, larger first."""
    base, extra = divmod(num_heads, parts)
    ranges, start = [], 0
    for j in range(parts):
        size = base + (1 if j < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


@dataclass
class HeadPlan:
    """Which heads each Ulysses rank gets, and how this rank's query heads read its kv heads."""

    q_ranges: list[tuple[int, int]]
    kv_ranges: list[tuple[int, int]]
    num_q_heads: int
    num_kv_heads: int
    kv_index: torch.Tensor | None  # local kv head of each local query head, when not a plain GQA group


def head_plan(num_q_heads: int, num_kv_heads: int, ulysses_size: int, ulysses_rank: int) -> HeadPlan:
    if num_q_heads < ulysses_size:
        raise ConfigError(
            f"context parallel Ulysses degree {ulysses_size} exceeds the {num_q_heads} attention heads"
        )
    groups = num_q_heads // num_kv_heads
    q_ranges = split_heads(num_q_heads, ulysses_size)
    kv_ranges = [(start // groups, (end - 1) // groups + 1) for start, end in q_ranges]
    q0, q1 = q_ranges[ulysses_rank]
    k0, k1 = kv_ranges[ulysses_rank]
    index = torch.tensor([(q0 + a) // groups - k0 for a in range(q1 - q0)])
    n_q, n_kv = q1 - q0, k1 - k0
    plain = n_q % n_kv == 0 and torch.equal(index, torch.arange(n_q) // (n_q // n_kv))
    return HeadPlan(q_ranges, kv_ranges, num_q_heads, num_kv_heads, None if plain else index)


def _scatter_heads(
    tensors: list[torch.Tensor], ranges: list[list[tuple[int, int]]], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """(B, H, s, D) sequence shards -> (B, h_me, U*s, D): this rank's heads over the group's sequence."""
    size, me = group.size(), group.rank()
    chunks = [
        torch.cat([t[:, r[j][0] : r[j][1]].reshape(-1) for t, r in zip(tensors, ranges)]) for j in range(size)
    ]
    shapes = [(t.shape[0], r[me][1] - r[me][0], t.shape[2], t.shape[3]) for t, r in zip(tensors, ranges)]
    numels = [b * h * s * d for b, h, s, d in shapes]
    received = comm.all_to_all(chunks, [sum(numels)] * size, group)
    outputs = []
    for i, (shape, numel) in enumerate(zip(shapes, numels)):
        offset = sum(numels[:i])
        pieces = [chunk[offset : offset + numel].view(shape) for chunk in received]
        outputs.append(torch.cat(pieces, dim=2))
    return outputs


def _gather_heads(
    tensors: list[torch.Tensor],
    ranges: list[list[tuple[int, int]]],
    num_heads: list[int],
    group: dist.ProcessGroup,
) -> list[torch.Tensor]:
    """Inverse of ``_scatter_heads``: (B, h_me, U*s, D) -> (B, H, s, D).

    A head that went to two ranks (a duplicated kv head) comes back from both, summed.
    """
    size = group.size()
    local = tensors[0].shape[2] // size
    chunks = [
        torch.cat([t[:, :, j * local : (j + 1) * local].reshape(-1) for t in tensors]) for j in range(size)
    ]
    numels_from = [
        sum(t.shape[0] * (r[i][1] - r[i][0]) * local * t.shape[3] for t, r in zip(tensors, ranges))
        for i in range(size)
    ]
    received = comm.all_to_all(chunks, numels_from, group)
    # Allocated as (B, s, H, D) and returned as its (B, H, s, D) view: a model that goes back to
    # (B, s, H*D) for the output projection then reshapes a view instead of copying (and saving) it.
    outputs = [
        t.new_zeros(t.shape[0], local, heads, t.shape[3]).transpose(1, 2) for t, heads in zip(tensors, num_heads)
    ]
    for i, chunk in enumerate(received):
        offset = 0
        for t, r, out in zip(tensors, ranges, outputs):
            h0, h1 = r[i]
            shape = (t.shape[0], h1 - h0, local, t.shape[3])
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            out[:, h0:h1] += chunk[offset : offset + numel].view(shape)
            offset += numel
    return outputs


class SeqToHeads(torch.autograd.Function):
    """q, k, v sequence shards (all heads) -> this rank's heads over the Ulysses group's whole sequence."""

    @staticmethod
    def forward(ctx, q, k, v, plan: HeadPlan, group: dist.ProcessGroup):
        ctx.plan, ctx.group = plan, group
        ranges = [plan.q_ranges, plan.kv_ranges, plan.kv_ranges]
        return tuple(_scatter_heads([q, k, v], ranges, group))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        plan = ctx.plan
        ranges = [plan.q_ranges, plan.kv_ranges, plan.kv_ranges]
        grads = _gather_heads(
            [dq, dk, dv], ranges, [plan.num_q_heads, plan.num_kv_heads, plan.num_kv_heads], ctx.group
        )
        return (*grads, None, None)


class HeadsToSeq(torch.autograd.Function):
    """The attention output of this rank's heads over the whole sequence -> its sequence shard, all heads."""

    @staticmethod
    def forward(ctx, out, plan: HeadPlan, group: dist.ProcessGroup):
        ctx.plan, ctx.group = plan, group
        return _gather_heads([out], [plan.q_ranges], [plan.num_q_heads], group)[0]

    @staticmethod
    def backward(ctx, grad):
        return _scatter_heads([grad], [ctx.plan.q_ranges], ctx.group)[0], None, None
