"""Rotary position embeddings: 1-D RoPE, Qwen2-VL M-RoPE, Qwen's 2-D vision form and 3-D video RoPE.

Every rotation has a plain reference and a fast path (``fast=True``).

**Half-split layout** (1-D, M-RoPE, vision; ``models/layers/rope.py``): channel ``i`` and channel
``i + head_dim / 2`` form a pair; the reference is ``x * cos + rotate_half(x) * sin`` with ``cos``/``sin``
tables of the full ``head_dim``. The fast path is a custom autograd Function that writes the two halves
of the output with ``mul`` + ``addcmul_`` into one tensor laid out like the input (no ``rotate_half``
negation and concatenation, no other temporaries of the input's size), keeps only the tables for
backward and computes the input gradient as the rotation by the opposite angle.

**Interleaved layout** (3-D video RoPE as in Wan2.1): channels ``2i`` and ``2i + 1`` form a pair
(the real and imaginary part of one complex number) and the pair is multiplied by ``exp(j * angle_i)``.
With ``c = head_dim / 2`` pairs, the first ``c - 2 * (c // 3)`` pairs rotate with the frame index, the
next ``c // 3`` with the row and the last ``c // 3`` with the column; each part has its own frequency
ladder ``theta ** (-2k / d_part)`` with ``d_part = 2 * pairs_in_part``. Tokens are ordered frame-major,
then row, then column (``(f * H + h) * W + w``). Tables have ``c`` entries, one per pair, and are the
same as ``models/wan/model.py WanRotaryEmbedding``'s. Both paths compute in fp32 and cast back. The
reference is the complex product differentiated by autograd; the fast path is a custom Function that
multiplies in place in the fp32 buffer it owns (one allocation fewer each way for low-precision inputs),
accepts a precomputed complex rotation table (:func:`video_rope_rotation`) and multiplies by its
conjugate in backward. Interleaved pairs are not rotated with real-arithmetic strided views: stride-2
access measured 2-5x slower than the complex kernels on the CPU.

Code being compiled (``train.compile``) takes the references of the half-split rotations: the compiler
fuses the plain formula itself, and the fast path's writes into views of one output are not traced
faithfully (AOT autograd gave wrong values for them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / dim)`` for ``i < dim / 2``, fp32 on the CPU (as the layers)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    return 1.0 / (theta**exponent)


def _cos_sin(half: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables from the half angles: cos/sin computed once, then repeated."""
    cos, sin = half.cos(), half.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


@torch.no_grad()
def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE tables for integer ``positions`` of any shape: ``(*positions.shape, head_dim)``.

    Angles are computed in fp32, as Hugging Face's rotary embeddings do.
    """
    angles = positions[..., None].float() * inv_freq.to(positions.device, torch.float32)
    return _cos_sin(angles, dtype)


def mrope_section_axes(
    mrope_section: Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """For each of the ``sum(mrope_section)`` half channels, the position axis (0 t, 1 h, 2 w) it uses."""
    axes = [i % 3 for i, size in enumerate(mrope_section) for _ in range(int(size))]
    return torch.tensor(axes, dtype=torch.long, device=device)


@torch.no_grad()
def mrope_cos_sin_reference(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, mrope_section: Sequence[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL M-RoPE tables exactly as ``models.layers.rope.MRopeEmbedding``: ``(batch, seq, head_dim)``.

    ``position_ids`` is ``(3, batch, seq)`` (temporal, height, width); the half head dimension is cut into
    ``mrope_section`` pieces and piece ``i`` takes its angles from axis ``i % 3``.
    """
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    pieces = angles.split(list(mrope_section), dim=-1)
    half = torch.cat([piece[i % 3] for i, piece in enumerate(pieces)], dim=-1)
    angles = torch.cat((half, half), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@torch.no_grad()
def mrope_cos_sin(
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
    mrope_section: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE tables with cos/sin taken once per half channel (one gather of the position axis).

    Bitwise equal to :func:`mrope_cos_sin_reference`, with half the transcendentals and no per-section
    slicing and concatenation.
    """
    axes = mrope_section_axes(mrope_section, position_ids.device)
    if axes.numel() != inv_freq.numel():
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {inv_freq.numel()}")
    # positions[axis(c), b, s] for every half channel c, then times that channel's inverse frequency.
    positions = position_ids.float().index_select(0, axes)  # (half, batch, seq)
    angles = positions.permute(1, 2, 0) * inv_freq.to(position_ids.device, torch.float32)
    return _cos_sin(angles, dtype)


def video_rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs given to the frame, row and column axes: ``(c - 2 * (c // 3), c // 3, c // 3)``."""
    if head_dim % 2:
        raise ValueError(f"3-D RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


@torch.no_grad()
def video_rope_cos_sin(
    head_dim: int,
    grid_fhw: Sequence[int],
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE tables for a ``(frames, height, width)`` token grid: fp32 ``(F * H * W, head_dim / 2)``.

    One entry per rotation pair, in the interleaved layout described in the module docstring. Angles and
    their cos/sin are computed in fp64 (as Wan2.1 does) and stored in fp32.
    """
    frames, height, width = (int(n) for n in grid_fhw)
    parts = video_rope_split(head_dim)
    grids = torch.meshgrid(
        torch.arange(frames, dtype=torch.float64),
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    angles = torch.cat(
        [pos.reshape(-1, 1) * _inv_freq_f64(2 * pairs, theta) for pos, pairs in zip(grids, parts)], dim=-1
    )
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _inv_freq_f64(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


# ---------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the two halves ``(a, b)`` of the last dimension to ``(-b, a)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * cos + rotate_half(x) * sin`` for ``q`` and ``k``, as ``models.layers.rope.apply_rotary``.

    ``cos``/``sin`` lack the head axis, which is inserted at ``unsqueeze_dim``.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_vision_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed vision ``q``/``k`` (N, heads, head_dim) rotated in fp32 and cast back, as the layers do."""
    q_out, k_out = apply_rotary_reference(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim=1)
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_video_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """3-D RoPE in complex form: ``x`` is ``(batch, seq, heads, head_dim)``, tables ``(seq, head_dim / 2)``.

    Pairs of adjacent channels are complex numbers multiplied by ``cos + j sin``; the product is formed
    in fp32 and cast back to ``x.dtype``.
    """
    _check_video_shapes(x, cos)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotation = torch.complex(cos.float(), sin.float())[:, None, :]  # (seq, 1, pairs)
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def _check_video_shapes(x: torch.Tensor, table: torch.Tensor) -> None:
    if x.dim() != 4 or table.shape != (x.shape[1], x.shape[-1] // 2):
        raise ValueError(
            f"3-D RoPE expects x (batch, seq, heads, head_dim) and tables (seq, head_dim/2); got x "
            f"{tuple(x.shape)} and tables {tuple(table.shape)}"
        )


# ---------------------------------------------------------------------------------------------------
# Fast paths
# ---------------------------------------------------------------------------------------------------


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Pairs ``(a, b)`` = (first half, second half) to ``(a c - b s, b c + a s)``; ``inverse``: by ``-angle``.

    ``cos``/``sin`` are full-width and broadcast against ``x``; their first half multiplies ``a`` and the
    second half ``b``, as in the reference. The output has ``x``'s memory layout.
    """
    shape = torch.broadcast_shapes(x.shape, cos.shape)
    out = torch.empty_like(x) if shape == x.shape else x.new_empty(shape)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    out_a, out_b = out[..., :half], out[..., half:]
    # Views of the full tables: measured ~2x faster in these kernels than contiguous half tables.
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if inverse:  # the transpose of the forward map: (a c1 + b s2, b c2 - a s1)
        torch.mul(a, c1, out=out_a).addcmul_(b, s2)
        torch.mul(b, c2, out=out_b).addcmul_(a, s1, value=-1)
    else:
        torch.mul(a, c1, out=out_a).addcmul_(b, s1, value=-1)
        torch.mul(b, c2, out=out_b).addcmul_(a, s2)
    return out


class _HalfRotaryFunction(torch.autograd.Function):
    """Half-split rotation computed in ``compute_dtype``, returned in ``out_dtype``; saves only the tables."""

    @staticmethod
    def forward(ctx, x, cos, sin, compute_dtype: torch.dtype, out_dtype: torch.dtype):
        ctx.save_for_backward(cos, sin)
        ctx.compute_dtype, ctx.x_dtype, ctx.x_shape = compute_dtype, x.dtype, x.shape
        cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
        return _rotate_halves(x.to(compute_dtype), cos, sin, inverse=False).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        cos, sin = cos.to(ctx.compute_dtype), sin.to(ctx.compute_dtype)
        grad = _rotate_halves(grad_out.to(ctx.compute_dtype), cos, sin, inverse=True)
        if grad.shape != ctx.x_shape:
            grad = grad.sum_to_size(ctx.x_shape)
        return grad.to(ctx.x_dtype), None, None, None, None


def _check_tables(*tables: torch.Tensor) -> None:
    if any(t.requires_grad for t in tables):
        raise ValueError("the fast rotary path does not differentiate the cos/sin tables; use fast=False")


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (half-split layout); signature and results as ``models.layers.rope.apply_rotary``.

    ``cos``/``sin`` (full ``head_dim``) lack the head axis, which is inserted at ``unsqueeze_dim``. The
    result dtype follows type promotion of ``q`` and the tables, as in the reference.
    """
    if not fast or torch.compiler.is_compiling():  # compiled: the compiler fuses the plain formula
        return apply_rotary_reference(q, k, cos, sin, unsqueeze_dim)
    _check_tables(cos, sin)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_dtype, k_dtype = torch.result_type(q, cos), torch.result_type(k, cos)
    return (
        _HalfRotaryFunction.apply(q, cos, sin, q_dtype, q_dtype),
        _HalfRotaryFunction.apply(k, cos, sin, k_dtype, k_dtype),
    )


def apply_vision_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed vision ``q``/``k`` (N, heads, head_dim) rotated in fp32 by (N, head_dim) tables, cast back."""
    if not fast or torch.compiler.is_compiling():
        return apply_vision_rotary_reference(q, k, cos, sin)
    _check_tables(cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (
        _HalfRotaryFunction.apply(q, cos, sin, torch.float32, q.dtype),
        _HalfRotaryFunction.apply(k, cos, sin, torch.float32, k.dtype),
    )


@torch.no_grad()
def video_rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The complex64 rotation table ``cos + j sin`` (seq, head_dim / 2) that :func:`apply_video_rotary` takes.

    Build it once per grid and share it across layers instead of passing ``cos``/``sin`` to every call.
    """
    return torch.complex(cos.float(), sin.float())


def _complex_pairs(x32: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(x32.unflatten(-1, (-1, 2)))


class _ComplexRotaryFunction(torch.autograd.Function):
    """Interleaved-pair rotation in fp32 by a complex table; backward multiplies by its conjugate."""

    @staticmethod
    def forward(ctx, x, rotation):
        ctx.save_for_backward(rotation)
        ctx.x_dtype = x.dtype
        x32 = x.float()
        if x32 is x or not x32.is_contiguous():
            out = torch.view_as_real(_complex_pairs(x32.contiguous()) * rotation)
        else:  # a fresh fp32 copy of low-precision x: rotate it in place
            out = torch.view_as_real(_complex_pairs(x32).mul_(rotation))
        return out.flatten(-2).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (rotation,) = ctx.saved_tensors
        g32 = grad_out.float()
        if g32 is grad_out or not g32.is_contiguous():
            grad = torch.view_as_real(_complex_pairs(g32.contiguous()) * rotation.conj())
        else:
            grad = torch.view_as_real(_complex_pairs(g32).mul_(rotation.conj()))
        return grad.flatten(-2).to(ctx.x_dtype), None


def apply_video_rotary(
    x: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    fast: bool = True,
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """3-D RoPE (interleaved pairs) of ``x`` (batch, seq, heads, head_dim) by (seq, head_dim / 2) tables.

    Computed in fp32 and cast back to ``x.dtype``; see :func:`video_rope_cos_sin` for the tables. The
    fast path also takes a precomputed ``rotation`` (:func:`video_rope_rotation`) instead of ``cos``/``sin``.
    """
    if not fast:
        if cos is None or sin is None:
            raise ValueError("the reference 3-D RoPE needs cos and sin")
        return apply_video_rotary_reference(x, cos, sin)
    if rotation is None:
        if cos is None or sin is None:
            raise ValueError("3-D RoPE needs cos and sin, or a rotation table")
        _check_tables(cos, sin)
        rotation = video_rope_rotation(cos, sin)
    _check_video_shapes(x, rotation)
    return _ComplexRotaryFunction.apply(x, rotation[:, None, :])
