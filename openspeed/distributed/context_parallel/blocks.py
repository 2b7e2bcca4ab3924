"""Attention of one block of queries against one block of keys, with its log-sum-exp, and its backward.

Ring attention splits one attention call into blocks (this rank's queries x the keys of one ring step),
computes each block's output and log-sum-exp (LSE), and merges them with the online softmax. The
backward recomputes each block's probabilities from the *final* output and LSE (flash-attention style),
so the block gradients add up to the exact gradient.

Which key a query may see is decided by global positions (causal: key position <= query position),
packed-sample segment ids (same segment only) and a key padding mask. ``plan_block`` turns those into
the cheapest equivalent kernel call: the smallest box of rows x columns that holds every visible pair,
then no mask (every pair in the box visible), ``is_causal`` (the box is a top-left causal triangle) or
an explicit boolean mask. Blocks with nothing visible are skipped.

On CPU the kernel is ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` op, which
take GQA key/value heads directly, return the LSE and accept the final output/LSE in the backward. On
other devices (or with ``math=True``, which the tests use to check both paths) an exact fp32 computation
with its own backward is used. A query with no visible key in a block gets LSE ``-inf`` (output 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


@dataclass
class BlockPlan:
    """How to compute one (query block, key block) pair.

    ``rows``/``cols`` bound every visible (query, key) pair; ``causal`` means the pairs visible inside
    that box are exactly a top-left causal triangle; otherwise ``mask`` (bool, ``(B or 1, 1, rows,
    cols)``, True = may attend) when not every pair in the box is visible. ``rows_visible`` (bool,
    ``(B or 1, rows)``) is set when some rows of the box see no key of this block.
    """

    rows: slice
    cols: slice
    causal: bool = False
    mask: torch.Tensor | None = None
    rows_visible: torch.Tensor | None = None


def plan_block(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> BlockPlan | None:
    """The plan for queries at global positions ``q_pos`` against keys at ``k_pos`` (``None``: skip).

    Positions must be increasing within each block (every layout here keeps them so). ``q_seg``/``k_seg``
    are segment ids of packed samples, ``key_valid`` a ``(batch, keys)`` bool padding mask.
    """
    n_q, n_k = q_pos.numel(), k_pos.numel()
    if q_seg is None and key_valid is None:
        if not causal:
            return BlockPlan(slice(0, n_q), slice(0, n_k))
        # Causal on increasing positions: visible rows are a suffix, visible columns a prefix.
        r0 = int(torch.searchsorted(q_pos, k_pos[:1]).item())
        c1 = int(torch.searchsorted(k_pos, q_pos[-1:], right=True).item())
        if r0 == n_q or c1 == 0:
            return None
        qb, kb = q_pos[r0:], k_pos[:c1]
        rows, cols = slice(r0, n_q), slice(0, c1)
        if qb[0] >= kb[-1]:
            return BlockPlan(rows, cols)
        seen = torch.searchsorted(kb, qb, right=True)  # how many keys each row sees (a prefix)
        triangle = torch.arange(1, qb.numel() + 1, device=qb.device).clamp(max=kb.numel())
        if torch.equal(seen, triangle):
            return BlockPlan(rows, cols, causal=True)
        return BlockPlan(rows, cols, mask=(kb[None, :] <= qb[:, None])[None, None])

    allowed = torch.ones(1, n_q, n_k, dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    if q_seg is not None:
        allowed = allowed & (q_seg[:, None] == k_seg[None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    rows_any = allowed.any(-1)  # (B, n_q)
    row_idx = rows_any.any(0).nonzero()
    if row_idx.numel() == 0:
        return None
    col_idx = allowed.any(-2).any(0).nonzero()
    rows = slice(int(row_idx[0]), int(row_idx[-1]) + 1)
    cols = slice(int(col_idx[0]), int(col_idx[-1]) + 1)
    box = allowed[:, rows, cols]
    if bool(box.all()):
        return BlockPlan(rows, cols)
    visible = rows_any[:, rows]
    rows_visible = None if bool(visible.all()) else visible
    triangle = torch.ones(box.shape[1:], dtype=torch.bool, device=box.device).tril()
    if rows_visible is None and bool((box == triangle).all()):
        return BlockPlan(rows, cols, causal=True)
    return BlockPlan(rows, cols, mask=box[:, None], rows_visible=rows_visible)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The CPU flash kernel wants a mask of the query's dtype: 0 where allowed, -inf elsewhere.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, _NEG_INF)


def _math_scores(q, k, plan: BlockPlan, scale: float) -> torch.Tensor:
    """fp32 scores of the box with disallowed pairs at -inf; kv heads already expanded."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if plan.causal:
        tril = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~tril, _NEG_INF)
    elif plan.mask is not None:
        scores = scores.masked_fill(~plan.mask, _NEG_INF)
    return scores


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(torch.isinf(lse), 0.0)


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float, math: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the plan's box: out ``(B, Hq, rows, D)`` in q's dtype, lse ``(B, Hq, rows)`` fp32.

    ``q`` is the full query block, ``k``/``v`` the full key block (``Hq`` a multiple of their heads).
    """
    qs, ks, vs = q[:, :, plan.rows], k[:, :, plan.cols], v[:, :, plan.cols]
    if q.device.type == "cpu" and not math:
        mask = None if plan.mask is None else _additive(plan.mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qs, ks, vs, 0.0, plan.causal, attn_mask=mask, scale=scale
        )
        lse = lse.float()
    else:
        groups = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        scores = _math_scores(qs, ks, plan, scale)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - _finite(lse)[..., None])
        out = torch.matmul(probs, vs.float()).to(q.dtype)
    if plan.rows_visible is not None:
        # Rows that see nothing here: the kernel reports LSE 0; they must weigh nothing in the merge.
        lse = lse.masked_fill(~plan.rows_visible[:, None, :], _NEG_INF)
    return out, lse


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    math: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block for q (box rows), k and v (box columns, kv heads), given the FINAL attention
    output ``out`` and LSE ``lse`` of the full query block (all keys), so block gradients add up exactly.

    ``lse`` must be finite: rows that see no key anywhere must come with ``dout`` zero and any finite LSE.
    """
    rows, cols = plan.rows, plan.cols
    qs, ks, vs = q[:, :, rows], k[:, :, cols], v[:, :, cols]
    dout_s, out_s, lse_s = dout[:, :, rows], out[:, :, rows], lse[:, :, rows]
    if q.device.type == "cpu" and not math:
        mask = None if plan.mask is None else _additive(plan.mask, q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_s, qs, ks, vs, out_s, lse_s, 0.0, plan.causal, attn_mask=mask, scale=scale
        )
    heads_kv = ks.shape[1]
    groups = qs.shape[1] // heads_kv
    kx, vx = ks.repeat_interleave(groups, 1).float(), vs.repeat_interleave(groups, 1).float()
    probs = torch.exp(_math_scores(qs, kx, plan, scale) - lse_s[..., None])
    dout_f = dout_s.float()
    dv = torch.matmul(probs.transpose(-1, -2), dout_f)
    dprobs = torch.matmul(dout_f, vx.transpose(-1, -2))
    delta = (dout_f * out_s.float()).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, kx)
    dk = torch.matmul(dscores.transpose(-1, -2), qs.float())

    def fold(g: torch.Tensor) -> torch.Tensor:  # sum the query heads sharing a kv head
        b, _, n, d = g.shape
        return g.view(b, heads_kv, groups, n, d).sum(2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def merge_block(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, rows: slice
) -> None:
    """Online softmax: fold a block's ``(out, lse)`` for ``rows`` into the fp32 accumulators in place."""
    old = lse_acc[:, :, rows]
    new = torch.logaddexp(old, lse)
    safe = _finite(new)  # both -inf: keep weights exp(-inf) = 0 instead of NaN
    w_old = torch.exp(old - safe)[..., None]
    w_new = torch.exp(lse - safe)[..., None]
    out_acc[:, :, rows].mul_(w_old).add_(out.float() * w_new)
    lse_acc[:, :, rows] = new
