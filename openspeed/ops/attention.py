"""The single attention entry point used by every native model.

Tensors are laid out ``(batch, heads, seq, head_dim)``. Keys/values may have fewer heads than queries
(grouped-query attention) as long as the query head count is a multiple of theirs; query head ``h``
reads key/value head ``h // (q_heads // kv_heads)``.

Three layouts are supported, in any combination with ``causal`` and GQA:

* dense: every row is one sequence (``attention_mask`` = ``None``);
* padded: rows with padding (``attention_mask`` 1 real / 0 padding);
* packed: one row holding several sequences back to back (``cu_seqlens``; MindSpeed's "EOD reset"),
  optionally with padding inside the row as well (``attention_mask`` too).

Backends: PyTorch SDPA everywhere; when the ``flash_attn`` package is installed and the tensors are
fp16/bf16 on a CUDA device, the padded and packed layouts go through ``flash_attn_varlen_func``
instead (padding is removed first, so no work is spent on it).

Attention metadata: what a layout needs besides q/k/v (the segment bounds as Python ints, the runs of
equal-length segments, and for flash-attn the kept-token indices, int32 ``cu_seqlens`` and the longest
sequence) is the same for every layer of a forward. A model builds one :class:`AttentionPlan` per
forward (:func:`attention_plan`) and passes it to every layer's call (``plan=``); the plan derives each
piece on first use and keeps it, so a forward reads ``cu_seqlens`` / the padding mask on the host
at most once, whatever its depth. Calls with ``attention_mask`` / ``cu_seqlens`` instead build a plan
of their own (derived per call, as before).

Context parallelism: inside :func:`context_parallel_scope` (entered by the cp plan's module hooks,
see :mod:`openspeed.distributed.context_parallel.modules`), ``q``/``k``/``v`` are one rank's sequence
shard and the call is answered by the cp algorithm (Ulysses, ring or hybrid) over the whole sequence;
``attention_mask`` is then the local shard and ``cu_seqlens`` stays global (a plan holds them as
given, and keeps what the cp algorithm derives from them for the forward's later layers).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

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


# --------------------------------------------------------------------------------------------------
# Attention metadata, once per forward
# --------------------------------------------------------------------------------------------------


def _segment_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int) -> list[int]:
    """``cu_seqlens`` as a checked Python list (a host copy: pass a CPU tensor to avoid a device sync)."""
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed sequence, got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq:
        raise ValueError(f"cu_seqlens must run from 0 to seq ({seq}), got {bounds[0]}..{bounds[-1]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return bounds


def _equal_length_runs(bounds: list[int]) -> list[tuple[int, int, int]]:
    """``(start, length, count)``: maximal runs of back-to-back non-empty segments of one length."""
    runs: list[list[int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        if runs and runs[-1][1] == end - start:
            runs[-1][2] += 1
        else:
            runs.append([start, end - start, 1])
    return [(start, length, count) for start, length, count in runs]


class VarlenLayout:
    """The token-major layout of flash-attn's varlen kernels for one plan on one device.

    ``keep``: indices of the real tokens in the flattened ``(batch * seq)`` order (``None`` without
    padding); ``cu_seqlens``: int32 cumulative lengths of the non-empty sequences, on the device;
    ``max_len``: the longest of them (a Python int); ``empty``: no real token at all.
    """

    def __init__(self, keep: torch.Tensor | None, cu_seqlens: torch.Tensor, max_len: int, empty: bool) -> None:
        self.keep, self.cu_seqlens, self.max_len, self.empty = keep, cu_seqlens, max_len, empty


class AttentionPlan:
    """The layout of one forward's attention calls, and what the calls derive from it, kept.

    Build it with :func:`attention_plan` once per forward and pass it to every layer's
    :func:`attention` call. ``attention_mask`` / ``cu_seqlens`` are held as given (under context
    parallelism the mask is the rank's local shard and ``cu_seqlens`` global); the segment bounds,
    the SDPA runs and the flash-attn layout are derived on first use (checked against that call's
    query shape) and reused by the later calls. ``cache`` is for other consumers of the plan (the
    context-parallel attention keeps its masks and block plans there).
    """

    def __init__(self, attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> None:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
        self.attention_mask = attention_mask
        self.cu_seqlens = cu_seqlens
        self.cache: dict[Any, Any] = {}
        self._bounds: list[int] | None = None
        self._shape: tuple[int, int] | None = None  # the (batch, seq) the bounds were checked against
        self._runs: list[tuple[int, int, int]] | None = None
        self._varlen: dict[torch.device, VarlenLayout] = {}

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def bounds(self, batch: int, seq: int) -> list[int] | None:
        """The checked segment bounds (``None`` when not packed); read on the host on first use."""
        if self.cu_seqlens is None:
            return None
        if self._shape is None:
            self._bounds = _segment_bounds(self.cu_seqlens, batch, seq)
            self._shape = (batch, seq)
        elif self._shape != (batch, seq):
            raise ValueError(
                f"this attention plan is for (batch, seq) = {self._shape}, got a call with {(batch, seq)}"
            )
        return self._bounds

    def runs(self, batch: int, seq: int) -> list[tuple[int, int, int]]:
        """``(start, length, count)`` runs of equal-length segments (see :func:`_packed_sdpa`)."""
        if self._runs is None:
            self._runs = _equal_length_runs(self.bounds(batch, seq))
        else:
            self.bounds(batch, seq)  # the shape check
        return self._runs

    def varlen(self, batch: int, seq: int, device: torch.device) -> VarlenLayout:
        """flash-attn's varlen layout for ``(batch, seq)`` queries on ``device``, built once.

        The only host read is here: the padding mask (one copy per plan) when there is one; the
        indices and lengths go to ``device`` once and stay there for every later layer.
        """
        layout = self._varlen.get(device)
        if layout is not None:
            self.bounds(batch, seq)  # the shape check
            return layout
        bounds = self.bounds(batch, seq)
        if bounds is None:
            bounds = list(range(0, batch * seq + 1, seq))  # one sequence per row of the flattened batch
        keep = None
        if self.attention_mask is None:
            lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            if tuple(self.attention_mask.shape) != (batch, seq):
                raise ValueError(
                    f"attention_mask {tuple(self.attention_mask.shape)} does not match the queries {(batch, seq)}"
                )
            real = self.attention_mask.reshape(-1).to("cpu", torch.bool)
            lengths = [int(real[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
            keep = real.nonzero().squeeze(1).to(device, non_blocking=True)
        lengths = [n for n in lengths if n > 0]
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        layout = VarlenLayout(keep, cu.to(device, non_blocking=True), max(lengths, default=0), not lengths)
        self._varlen[device] = layout
        return layout


def attention_plan(
    attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> AttentionPlan:
    """The :class:`AttentionPlan` of a forward: build it once, pass it to every layer's :func:`attention`.

    Args mean what they mean for :func:`attention`. ``cu_seqlens`` is read on the host once (a CPU
    tensor, as the collator builds it, costs no device sync); the padding mask is read on the host
    once only if the flash-attn varlen path runs.
    """
    return AttentionPlan(attention_mask, cu_seqlens)


# --------------------------------------------------------------------------------------------------
# Packed sequences (cu_seqlens)
# --------------------------------------------------------------------------------------------------


def _run_as_batch(t: torch.Tensor, start: int, length: int, n: int) -> torch.Tensor:
    """(1, H, seq, D) -> (n, H, length, D): ``n`` adjacent segments from ``start`` as batch rows (a view)."""
    rows = t[0, :, start : start + n * length]
    return rows.reshape(t.shape[1], n, length, t.shape[3]).transpose(0, 1)


# Outside torch.compile's graphs: the loop runs over this batch's segments, so tracing it would
# specialise (and recompile) on every new packing.
@torch.compiler.disable
def _packed_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    plan: AttentionPlan,
    scale: float | None,
) -> torch.Tensor:
    """Packed attention with SDPA: each run of back-to-back equal-length segments is one batched call.

    A block-diagonal mask would cost O(seq^2) work and memory and keep SDPA off its fused kernels.
    Instead a run of ``n`` adjacent segments of one length is viewed (no copy) as a batch of ``n``
    rows: the vision tower's windows, mostly of one size, take a few calls per image rather than one
    per window, and a packed text row of ``n`` samples takes at most ``n`` calls.
    """
    runs = plan.runs(q.shape[0], q.shape[2])
    if not runs:
        return torch.empty_like(q)
    attention_mask = plan.attention_mask
    heads, dim = q.shape[1], q.shape[3]
    outputs = []
    for start, length, n in runs:
        qr, kr, vr = (_run_as_batch(t, start, length, n) for t in (q, k, v))
        mask = None
        if attention_mask is not None:
            mask = attention_mask[0, start : start + n * length].reshape(n, length)
        out = _dense_attention(qr, kr, vr, causal, mask, scale)  # (n, H, length, D)
        outputs.append(out.transpose(0, 1).reshape(1, heads, n * length, dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


# --------------------------------------------------------------------------------------------------
# flash-attn varlen (CUDA, fp16/bf16, only when the package is installed)
# --------------------------------------------------------------------------------------------------


@functools.cache
def _flash_varlen_func() -> Callable | None:
    """``flash_attn.flash_attn_varlen_func`` when flash-attn is installed and imports, else ``None``."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - a broken flash-attn build falls back to SDPA
        return None
    return flash_attn_varlen_func


def _flash_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The dtype flash-attn's varlen kernel would run this call in, or ``None`` when it cannot take it.

    Under autocast that is the autocast dtype (as for SDPA, which autocast casts down too): the
    model's rotary step leaves q/k in fp32 even when the projections ran in bf16.
    """
    if q.device.type != "cuda" or q.shape[-1] > 256 or q.shape[-1] % 8 != 0:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    if dtype not in (torch.float16, torch.bfloat16) or _flash_varlen_func() is None:
        return None
    return dtype


@torch.compiler.disable
def _flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    plan: AttentionPlan,
    scale: float | None,
) -> torch.Tensor:
    """Padded and/or packed attention through ``flash_attn_varlen_func``.

    Every row (or, packed, every segment of the single row) is one variable-length sequence; with
    a padding mask its padding tokens are removed first. Causal masking within the remaining tokens
    of a sequence equals the top-left causal mask over the padded row restricted to real keys (what
    the SDPA path computes), whatever the padding layout. Padding queries get zeros. The layout
    comes from the plan (built by its first call, reused by the others): no host copy here.
    """
    batch, q_heads, seq, dim = q.shape
    layout = plan.varlen(batch, seq, q.device)
    if layout.empty:
        return torch.zeros_like(q)
    # (B, H, S, D) -> (B*S, H, D): the token-major layout flash-attn's varlen kernels take.
    qf, kf, vf = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (q, k, v))
    keep = layout.keep
    if keep is not None:
        qf, kf, vf = qf.index_select(0, keep), kf.index_select(0, keep), vf.index_select(0, keep)
    cu, longest = layout.cu_seqlens, layout.max_len
    out = _flash_varlen_func()(
        qf, kf, vf, cu, cu, longest, longest,
        dropout_p=0.0, softmax_scale=scale, causal=causal,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    if keep is not None:
        out = out.new_zeros(batch * seq, q_heads, dim).index_copy(0, keep, out)
    return out.view(batch, seq, q_heads, dim).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


# The context-parallel group attention calls are answered over, while a cp module runs.
_context_parallel: Any = None


@contextlib.contextmanager
def context_parallel_scope(cp: Any) -> Iterator[None]:
    """Within this block, :func:`attention` runs context-parallel over ``cp`` (a ``ContextParallel``)."""
    global _context_parallel
    previous, _context_parallel = _context_parallel, cp
    try:
        yield
    finally:
        _context_parallel = previous


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; returns a tensor shaped like ``q``.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``; ``k``/``v`` may have fewer heads (GQA).
        causal: mask out keys after the query. Queries and keys are assumed to be the same positions
            (no KV cache), i.e. the mask is aligned top-left. With ``causal=False`` the keys may be
            longer than the queries (a KV-cache decode step); ``attention_mask`` then covers the keys.
        attention_mask: ``(batch, seq)`` with 1 for real tokens and 0 for padding. Padding keys are
            never attended to; padding queries produce finite garbage (zeros on the flash path).
        cu_seqlens: int cumulative segment lengths ``[0, l0, l0 + l1, ..., seq]`` for a batch of one
            packed sequence; attention never crosses a segment boundary (and ``causal`` applies within
            each segment). Empty segments are allowed. It is read on the host: a CPU tensor avoids a
            device sync. May be combined with ``attention_mask`` (padding inside segments).
        scale: softmax scale; ``head_dim ** -0.5`` when ``None``.
        plan: the forward's :class:`AttentionPlan` (:func:`attention_plan`) instead of
            ``attention_mask`` / ``cu_seqlens``: what those imply is then derived once per forward,
            not once per call.
    """
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if plan is None:
        plan = AttentionPlan(attention_mask, cu_seqlens)
    elif attention_mask is not None or cu_seqlens is not None:
        raise ValueError("pass either plan or attention_mask / cu_seqlens, not both")
    if _context_parallel is not None:
        from openspeed.distributed.context_parallel import context_parallel_attention

        return context_parallel_attention(
            q, k, v, cp=_context_parallel, causal=causal, attention_mask=plan.attention_mask,
            cu_seqlens=plan.cu_seqlens, scale=scale, plan=plan,
        )
    # Dense batches stay on SDPA, whose own fused kernels cover them, and so do queries shorter than
    # the keys (KV-cache decode steps), which the varlen call below does not lay out.
    flash_dtype = None
    if (plan.packed or plan.attention_mask is not None) and q.shape[2] == k.shape[2]:
        flash_dtype = _flash_dtype(q)
    if flash_dtype is not None:
        q, k, v = (t.to(flash_dtype) for t in (q, k, v))
        return _flash_varlen_attention(q, k, v, causal, plan, scale)
    if not plan.packed:
        return _dense_attention(q, k, v, causal, plan.attention_mask, scale)
    return _packed_sdpa(q, k, v, causal, plan, scale)
