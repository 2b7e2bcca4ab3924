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

Kernels, all of which return the LSE and take the final output/LSE in the backward:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` op (GQA heads
  directly, additive mask).
* CUDA: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``) for fp16/bf16 blocks without a
  mask (GQA heads directly; ``is_causal`` only on square boxes, where its alignment is top-left), else
  ``aten._scaled_dot_product_efficient_attention`` (+ ``_backward``), which takes an additive mask and
  fp32 (key/value heads expanded for it, their gradients summed back). Head dims must be a multiple of
  8 and at most 256. Its LSE is padded on the sequence dim (to a multiple of 32 on this torch): sliced
  here, and padded again for its backward.
* Elsewhere, for head dims or dtypes the kernels do not take, or with ``math=True`` (which the tests
  use to check the others against): an exact fp32 computation with its own backward.

An op missing from this torch build, or with another signature than expected, means the math path
(:func:`fused_kernel` says which kernel a block gets); a fused call that fails its own checks warns
once and leaves that kernel to the math path for the rest of the process. A query with no visible key
in a block gets LSE ``-inf`` (output 0).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

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
    # Additive masks built from ``mask`` for the kernels, by (kind, dtype, device): a plan is reused by
    # every layer of a forward (see ``attention.py``), so each is built once.
    biases: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)


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


# --------------------------------------------------------------------------------------------------
# CUDA kernels (aten's flash and memory-efficient attention, with their LSE)
# --------------------------------------------------------------------------------------------------

# The argument names each op is called with here (its torch 2.x schema); an op whose schema differs
# is not used.
_SCHEMAS = {
    "_scaled_dot_product_flash_attention": (
        "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale",
    ),
    "_scaled_dot_product_flash_attention_backward": (
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale",
    ),
    "_scaled_dot_product_efficient_attention": (
        "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale",
    ),
    "_scaled_dot_product_efficient_attention_backward": (
        "grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
        "dropout_p", "grad_input_mask", "is_causal", "scale",
    ),
}
_KERNEL_OPS = {
    "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "efficient": ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
}
_HALF = (torch.float16, torch.bfloat16)
# Kernels whose call failed in this process (see _run_fused): the math path answers for them.
_failed: set[str] = set()
# The dropout RNG state tensors a kernel's forward returned (unused without dropout, but its backward
# takes them), by (kernel, device): the backward passes what the forward gave.
_rng_state: dict[tuple[str, torch.device], tuple[Any, Any]] = {}


@functools.cache
def _aten_op(name: str) -> Any:
    """``torch.ops.aten.<name>.default`` if this build has it with the expected arguments, else ``None``."""
    packet = getattr(torch.ops.aten, name, None)
    op = getattr(packet, "default", None)
    if op is None:
        return None
    names = tuple(arg.name for arg in op._schema.arguments)
    return op if names == _SCHEMAS[name] else None


def _kernel_available(kernel: str) -> bool:
    return kernel not in _failed and all(_aten_op(name) is not None for name in _KERNEL_OPS[kernel])


def _span(s: slice) -> int:
    return s.stop - s.start


def fused_kernel(q: torch.Tensor, k: torch.Tensor, plan: BlockPlan) -> str | None:
    """The CUDA kernel a block gets: ``"flash"``, ``"efficient"``, or ``None`` (the CPU kernel or math)."""
    return _kernel_choice(q, k, plan) if q.device.type == "cuda" else None


def _kernel_choice(q: torch.Tensor, k: torch.Tensor, plan: BlockPlan) -> str | None:
    """:func:`fused_kernel` for a block of CUDA tensors (apart so that its logic can be run elsewhere)."""
    dim = q.shape[-1]
    if dim % 8 != 0 or dim > 256 or k.shape[-1] != dim:
        return None
    square = _span(plan.rows) == _span(plan.cols)
    if plan.mask is None and (square or not plan.causal) and q.dtype in _HALF and _kernel_available("flash"):
        return "flash"
    if q.dtype in (*_HALF, torch.float32) and _kernel_available("efficient"):
        return "efficient"
    return None


def _expand_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    return k if groups == 1 else k.repeat_interleave(groups, 1)


def _fold_heads(g: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """Sum the gradients of the query heads that share a key/value head: (B, Hq, n, D) -> (B, Hkv, n, D)."""
    b, h, n, d = g.shape
    return g if h == heads_kv else g.view(b, heads_kv, h // heads_kv, n, d).sum(2)


def _kernel_bias(plan: BlockPlan, q: torch.Tensor, relax_blind_rows: bool) -> torch.Tensor | None:
    """The efficient kernel's additive mask, ``(B, Hq, rows, cols)`` in q's dtype (``None`` without a mask).

    Its last dim is padded to a multiple of 16 and sliced back (the kernel needs aligned strides), the
    batch and head dims broadcast (stride 0). ``relax_blind_rows`` lets rows that see no key of this
    block see all of them instead: their output is then finite (the merge weighs it by zero) where the
    kernel would give an undefined one; the backward takes the exact mask.
    """
    if plan.mask is None:
        return None
    key = ("efficient", relax_blind_rows, q.dtype, q.device)
    bias = plan.biases.get(key)
    if bias is None:
        allowed = plan.mask.to(q.device)
        if relax_blind_rows and plan.rows_visible is not None:
            allowed = allowed | ~plan.rows_visible.to(q.device)[:, None, :, None]
        cols = allowed.shape[-1]
        padded = torch.full((*allowed.shape[:-1], -(-cols // 16) * 16), _NEG_INF, dtype=q.dtype, device=q.device)
        bias = padded[..., :cols].masked_fill_(allowed, 0.0)
        plan.biases[key] = bias
    return bias.expand(q.shape[0], q.shape[1], bias.shape[2], bias.shape[3])


def _fused_forward(kernel: str, q, k, v, plan: BlockPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the box (``q``/``k``/``v`` already cut to it) through a CUDA kernel."""
    n_q = q.shape[2]
    if kernel == "flash":
        result = _aten_op(_KERNEL_OPS["flash"][0])(q, k, v, 0.0, plan.causal, False, scale=scale)
        out, lse, seed, offset = result[0], result[1], result[6], result[7]
    else:
        groups = q.shape[1] // k.shape[1]
        bias = _kernel_bias(plan, q, relax_blind_rows=True)
        result = _aten_op(_KERNEL_OPS["efficient"][0])(
            q, _expand_kv(k, groups), _expand_kv(v, groups), bias, True, 0.0, plan.causal, scale=scale
        )
        out, lse, seed, offset = result[0], result[1], result[2], result[3]
    _rng_state[(kernel, q.device)] = (seed, offset)
    return out, lse[..., :n_q].float()


def _fused_backward(
    kernel: str, dout, q, k, v, out, lse, plan: BlockPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the box (every tensor already cut to it) through a CUDA kernel's backward."""
    n_q, n_k = q.shape[2], k.shape[2]
    seed, offset = _rng_state.get((kernel, q.device)) or _rng_placeholders(kernel)
    lse = lse.float()
    if kernel == "flash":
        return _aten_op(_KERNEL_OPS["flash"][1])(
            dout, q, k, v, out, lse.contiguous(), None, None, n_q, n_k, 0.0, plan.causal, seed, offset,
            scale=scale,
        )
    heads_kv = k.shape[1]
    groups = q.shape[1] // heads_kv
    # The LSE as the forward returns it: padded on the sequence dim to a multiple of 32.
    padded = lse.new_zeros(*lse.shape[:2], -(-n_q // 32) * 32)
    padded[..., :n_q] = lse
    dq, dk, dv, _ = _aten_op(_KERNEL_OPS["efficient"][1])(
        dout, q, _expand_kv(k, groups), _expand_kv(v, groups), _kernel_bias(plan, q, relax_blind_rows=False),
        out, padded, seed, offset, 0.0, [True, True, True, False], plan.causal, scale=scale,
    )
    return dq, _fold_heads(dk, heads_kv), _fold_heads(dv, heads_kv)


def _rng_placeholders(kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a forward without dropout returns as its RNG state, for a backward with no forward before it."""
    if kernel == "flash":
        return torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64)
    return torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)


def _run_fused(kernel: str, fn, *args):
    """``fn(kernel, *args)``, or ``None`` after a warning when the kernel refuses the call (its own
    argument checks: a layout or build this code did not foresee); the math path then answers, for
    this call and, as the kernel would refuse again, for the rest of the process."""
    try:
        return fn(kernel, *args)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError) as error:
        _failed.add(kernel)
        warnings.warn(
            f"ring attention: the CUDA {kernel} attention kernel failed ({error}); its blocks use the "
            "exact fp32 math path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# --------------------------------------------------------------------------------------------------
# One block, forward and backward
# --------------------------------------------------------------------------------------------------


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float, math: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the plan's box: out ``(B, Hq, rows, D)`` in q's dtype, lse ``(B, Hq, rows)`` fp32.

    ``q`` is the full query block, ``k``/``v`` the full key block (``Hq`` a multiple of their heads).
    """
    qs, ks, vs = q[:, :, plan.rows], k[:, :, plan.cols], v[:, :, plan.cols]
    kernel = None if math else fused_kernel(q, k, plan)
    fused = None if kernel is None else _run_fused(kernel, _fused_forward, qs, ks, vs, plan, scale)
    if fused is not None:
        out, lse = fused
    elif q.device.type == "cpu" and not math:
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
    kernel = None if math else fused_kernel(q, k, plan)
    if kernel is not None:
        grads = _run_fused(kernel, _fused_backward, dout_s, qs, ks, vs, out_s, lse_s, plan, scale)
        if grads is not None:
            dq, dk, dv = grads
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
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
