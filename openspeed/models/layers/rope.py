"""Rotary position embeddings: the plain 1-D form, Qwen's 2-D vision form and text M-RoPE.

Angles are always computed in fp32. Inverse frequencies are kept in non-persistent buffers that
follow the default device at construction (so a ``meta`` build is entirely ``meta``) and can be
refilled with ``reset_buffers()`` once real storage exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the two halves ``(a, b)`` of the last dimension to ``(-b, a)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by the angles whose cosines/sines are ``cos``/``sin``.

    ``cos``/``sin`` lack the head axis; ``unsqueeze_dim`` says where to insert it so that they broadcast
    against ``q``/``k`` (1 for ``(batch, heads, seq, dim)``, 2 for ``(batch, seq, heads, dim)``).
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / dim)`` for ``i < dim / 2``, in fp32 on the CPU.

    Always computed on the CPU so every device starts from bit-identical frequencies.
    """
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    return 1.0 / (theta**exponent)


def _buffer_device(buf: torch.Tensor, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cpu") if buf.is_meta else buf.device


class VisionRotaryEmbedding(nn.Module):
    """2-D rotary embedding for vision patches.

    Half of each head's channels rotate with the patch row, the other half with the column. The same
    frequency ladder (over ``head_dim // 2`` channels) serves both axes; the angle vector is laid out as
    ``[row angles, column angles]`` and then repeated twice so that it covers the full head dimension in
    the ``rotate_half`` convention.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = rope_inv_freq(head_dim // 2, theta).to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute ``inv_freq`` (e.g. after ``to_empty``); defaults to the buffer's current device."""
        device = _buffer_device(self.inv_freq, device)
        self.inv_freq = rope_inv_freq(self.head_dim // 2, self.theta).to(device)

    @torch.no_grad()
    def forward(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hw_positions``: (N, 2) row/column indices. Returns fp32 ``cos, sin`` of shape (N, head_dim)."""
        inv_freq = self.inv_freq.to(device=hw_positions.device, dtype=torch.float32)
        angles = hw_positions[..., None].float() * inv_freq  # (N, 2, head_dim // 4)
        angles = angles.flatten(-2)  # row angles then column angles
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def apply_vision_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate packed vision ``q``/``k`` of shape (N, heads, head_dim) by (N, head_dim) ``cos``/``sin``.

    The rotation runs in fp32 and is cast back, as in the reference vision tower.
    """
    q_out, k_out = apply_rotary(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim=1)
    return q_out.to(q.dtype), k_out.to(k.dtype)


def mrope_angles(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, mrope_section: Sequence[int]
) -> torch.Tensor:
    """Multimodal rotary angles.

    ``position_ids`` has shape (3, batch, seq) holding temporal/height/width positions. The half head
    dimension is cut into ``mrope_section`` pieces; piece ``i`` takes its angles from axis ``i % 3``.
    The result, shape (batch, seq, head_dim), repeats that half twice.
    """
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    pieces = angles.split(list(mrope_section), dim=-1)
    half = torch.cat([piece[i % 3] for i, piece in enumerate(pieces)], dim=-1)
    return torch.cat((half, half), dim=-1)


class MRopeEmbedding(nn.Module):
    """Text-side M-RoPE: cos/sin for 3-axis positions, cast to the activation dtype."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int]) -> None:
        super().__init__()
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = tuple(int(s) for s in mrope_section)
        inv_freq = rope_inv_freq(head_dim, theta).to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute ``inv_freq`` (e.g. after ``to_empty``); defaults to the buffer's current device."""
        device = _buffer_device(self.inv_freq, device)
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta).to(device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids``: (3, batch, seq). Returns ``cos, sin`` of shape (batch, seq, head_dim) in ``dtype``."""
        angles = mrope_angles(self.inv_freq, position_ids, self.mrope_section)
        return angles.cos().to(dtype), angles.sin().to(dtype)
