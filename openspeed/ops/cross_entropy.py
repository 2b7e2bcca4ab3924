"""Fused linear + cross-entropy: the LM-head loss without materialising the full ``(N, V)`` logits.

Reference: ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum") / divisor``
(``reduction="mean"`` over the non-ignored targets when no divisor is given), the semantics of
``models/qwen2_5_vl/model.py causal_lm_loss`` with ``num_items_in_batch``. Autograd keeps the logits
and the fp32 log-softmax, two ``(N, V)`` tensors, for backward.

Fast path: a custom autograd Function walks the tokens in chunks of ``chunk_size``. For each chunk it
forms the logits (in the weight's dtype, as ``F.linear``), upcasts them to fp32, takes their
``log_softmax`` (the kernel ``F.cross_entropy`` uses, so per-token losses are the reference's) and, when
gradients are needed, turns that buffer in place into ``softmax - onehot(target)`` (zero on ignored
rows) and applies it at once:

- ``stash`` mode (default, ``recompute=False``): ``grad_hidden[chunk] = G @ W`` and
  ``grad_weight += G^T @ hidden[chunk]`` are computed during the forward, for the *sum* of the token
  losses, and stashed; backward only scales them by the incoming gradient (which carries ``1 / divisor``).
  Three matmuls in all, as the reference; kept for backward: an ``(N, H)`` and a ``(V, H)`` tensor in
  the dtypes of ``hidden`` and ``weight``.
- ``recompute`` mode: forward keeps only ``hidden``, the targets and an fp32 log-sum-exp per token;
  backward recomputes each chunk's logits (four matmuls in all), and nothing of size ``V x H`` is kept
  between forward and backward beyond the weight itself.

Only rows with a target enter the chunks (the others contribute neither loss nor gradient), so the
LM head's three matmuls run over the labelled tokens alone. Either way at most one chunk of logits
(``chunk_size x V`` fp32) exists at a time. The loss is the fp32 sum of per-chunk sums. The weight
gradient is accumulated over chunks in an fp32 buffer by an fp32-accumulating GEMM
(:func:`addmm_fp32_`: mixed precision where the device has it, upcast operands on the CPU) and cast
to the weight's dtype once. Stashed gradients are scaled in place, so the graph cannot be
backpropagated twice (``retain_graph=True`` + a second ``backward`` raises).

The fast path works on plain tensors; under tensor parallelism (vocab-sharded logits inside
``loss_parallel``) keep the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: 1024, fewer for vocabularies so large that a chunk's fp32 logits pass 512 MiB.

    Measured at hidden 512/2048: on the CPU (vocab 32000) chunks of 256 to 2048 tokens ran at the same
    speed; on an H100 (vocab 152064, bf16) 128-token chunks ran 3x slower than the reference, while
    1024-token chunks came within ~15% of it at a fifth of its peak memory.
    """
    return max(128, min(1024, (128 * 1024 * 1024) // max(vocab_size, 1)))


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    divisor: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight).float(), targets)``: sum / ``divisor``, or the mean if None."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    reduction = "mean" if divisor is None else "sum"
    loss = F.cross_entropy(
        logits.float(), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )
    return loss if divisor is None else loss / divisor


# (device type, operand dtype) pairs for which ``torch.addmm(..., out_dtype=torch.float32)`` works
# (True) or not (False); probed once each.
_MIXED_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def _mixed_addmm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return False
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        try:
            a = torch.zeros(2, 2, dtype=dtype, device=device)
            acc = torch.zeros(2, 2, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _MIXED_ADDMM[key] = False
    return _MIXED_ADDMM[key]


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc (fp32) += a @ b`` in place, accumulating in fp32 without rounding the product to ``a``'s dtype.

    The fast path's weight-gradient accumulator over chunks. Low-precision ``a``/``b`` go straight into
    a mixed-precision GEMM (``addmm(..., out_dtype=float32)``) where the device has one (CUDA), and are
    upcast to fp32 otherwise (on the CPU that is also the faster choice without AMX). Either way the
    result is at least as exact as summing per-chunk products rounded to the low precision.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _mixed_addmm_supported(acc.device, a.dtype):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


def _chunk_loss_and_grad_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    with_grad: bool,
    with_lse: bool = False,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One chunk: (sum of token losses, log-sum-exp per token, d(sum)/d(logits) in the weight's dtype).

    Forward (``lse`` None): the per-token losses come from the same ``log_softmax`` kernel the
    reference's ``F.cross_entropy`` uses; the log-sum-exp is returned when ``with_lse``. Backward
    recompute (``lse`` given): only the gradient, from ``exp(logits - lse)``.
    """
    logits = F.linear(hidden, weight).float()  # a fresh fp32 buffer (a copy for low precision)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    loss = None
    if lse is None:
        log_probs = torch.log_softmax(logits, dim=-1)
        loss = -torch.where(valid, log_probs.gather(1, safe_targets).squeeze(1), 0.0).sum()
        if with_lse:
            # lse = logit - log_prob at any column; at the row's largest logit log_prob is in
            # [-log V, 0], so the difference is as accurate as logsumexp (one pass cheaper here).
            top, top_index = logits.max(dim=-1, keepdim=True)
            lse = (top - log_probs.gather(1, top_index)).squeeze(1)
        probs = log_probs.exp_() if with_grad else None  # softmax, in place
    else:
        probs = logits.sub_(lse.unsqueeze(1)).exp_() if with_grad else None
    grad_logits = None
    if probs is not None:
        probs.scatter_add_(1, safe_targets, -valid.to(probs.dtype).unsqueeze(1))
        # Rows of ignored tokens carry no gradient (a mask, not an index: no host sync on GPUs).
        probs.masked_fill_(~valid.unsqueeze(1), 0.0)
        grad_logits = probs.to(weight.dtype)
    return loss, lse, grad_logits


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses over chunks; gradients stashed in forward or recomputed in backward."""

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, recompute: bool, grad_enabled: bool
    ):
        # ``needs_input_grad`` ignores the caller's grad mode, hence ``grad_enabled`` (no_grad evaluation).
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        stash = (need_hidden or need_weight) and not recompute
        grad_hidden = torch.empty_like(hidden) if stash and need_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if stash and need_weight
            else None
        )
        lse_all = (
            torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) if recompute else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            loss, lse, grad_logits = _chunk_loss_and_grad_logits(
                h, weight, targets[rows], ignore_index, stash, with_lse=lse_all is not None
            )
            total += loss
            if lse_all is not None:
                lse_all[rows] = lse
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                addmm_fp32_(grad_weight, grad_logits.t(), h)
        ctx.ignore_index, ctx.chunk_size, ctx.recompute = ignore_index, chunk_size, recompute
        ctx.weight_dtype = weight.dtype
        ctx.consumed = False
        if recompute:
            ctx.save_for_backward(hidden, weight, targets, lse_all)
        else:
            # The fp32 accumulator is kept in the weight's dtype (half the bytes for bf16; the scale
            # applied in backward then rounds once more). Saved as tensors, not ctx attributes, so
            # saved-tensor hooks (offloading, memory accounting) see them; scaled in place in backward.
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
            ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.recompute:
            grad_hidden, grad_weight = _recompute_grads(ctx)
        else:
            if ctx.consumed:
                raise RuntimeError("fused linear cross-entropy (stash mode) cannot run backward twice")
            ctx.consumed = True
            grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _recompute_grads(ctx) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    hidden, weight, targets, lse_all = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    )
    for start in range(0, hidden.shape[0], ctx.chunk_size):
        rows = slice(start, start + ctx.chunk_size)
        h = hidden[rows]
        _, _, grad_logits = _chunk_loss_and_grad_logits(
            h, weight, targets[rows], ctx.ignore_index, True, lse=lse_all[rows]
        )
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            addmm_fp32_(grad_weight, grad_logits.t(), h)
    return grad_hidden, grad_weight


def can_fuse(weight: torch.Tensor) -> bool:
    """Whether :func:`fused_linear_cross_entropy` can take this LM-head weight: a plain tensor (not a
    tensor subclass such as a vocab-sharded DTensor, whose loss runs through ``loss_parallel``)."""
    return type(weight) in (torch.Tensor, torch.nn.Parameter)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    divisor: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    recompute: bool = False,
    fast: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without the full logits.

    ``hidden`` is ``(..., H)``, ``weight`` ``(V, H)`` (an LM head without bias), ``targets`` the matching
    ``(...)`` token ids with ``ignore_index`` for tokens without a label (already aligned: shift them
    before, see :func:`causal_lm_loss_from_hidden`). Returns the fp32 sum of token losses divided by
    ``divisor``, or their mean when ``divisor`` is None. ``fast=False`` runs the reference;
    ``chunk_size`` (tokens per chunk, default :func:`default_chunk_size`) and ``recompute`` choose how
    the fast path trades memory for compute (module docstring).
    """
    if not fast:
        return linear_cross_entropy_reference(hidden, weight, targets, ignore_index, divisor)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1).to(hidden.device)
    if targets1d.shape[0] != hidden2d.shape[0]:
        raise ValueError(f"{hidden2d.shape[0]} hidden rows but {targets1d.shape[0]} targets")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(weight.shape[0])
    valid = targets1d != ignore_index
    if divisor is None:
        divisor = valid.sum()
    # Rows without a target add nothing to the loss and get no gradient: only labelled rows go through
    # the LM head (in SFT, prompts and image tokens are often a third or more of the sequence). The
    # row selection is one index on the host; ``index_select``'s backward scatters the gradient back.
    rows = valid.nonzero().squeeze(1)
    if rows.numel() < targets1d.numel():
        hidden2d, targets1d = hidden2d.index_select(0, rows), targets1d.index_select(0, rows)
    total = _FusedLinearCrossEntropy.apply(
        hidden2d, weight, targets1d, ignore_index, chunk, recompute, torch.is_grad_enabled()
    )
    return total / divisor


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets for labels aligned with the inputs (as ``causal_lm_loss`` shifts them)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    fast: bool = True,
    chunk_size: int | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """``causal_lm_loss(lm_head(hidden), labels, num_items_in_batch)`` without materialising the logits.

    ``hidden`` is the final-norm output ``(batch, seq, H)`` and ``labels`` ``(batch, seq)`` aligned with
    the inputs; the shift happens here.
    """
    targets = shift_labels(labels).to(hidden.device)
    return fused_linear_cross_entropy(
        hidden,
        lm_head_weight,
        targets,
        divisor=num_items_in_batch,
        chunk_size=chunk_size,
        recompute=recompute,
        fast=fast,
    )
