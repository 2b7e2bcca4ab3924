"""Rotary position embeddings: the plain 1-D form, Qwen's 2-D vision form and text M-RoPE.

Angles are always computed in fp32. Inverse frequencies are kept in non-persistent buffers that
follow the default device at construction (so a ``meta`` build is entirely ``meta``) and can be
refilled with ``reset_buffers()`` once real storage exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from openspeed.ops import rope as rope_ops
from openspeed.ops.level import fused
from openspeed.ops.rope import rope_inv_freq, rotate_half

__all__ = [
    "MRopeEmbedding",
    "VisionRotaryEmbedding",
    "apply_rotary",
    "apply_vision_rotary",
    "mrope_angles",
    "rope_inv_freq",
    "rotate_half",
]


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by the angles whose cosines/sines are ``cos``/``sin``.

    ``cos``/``sin`` lack the head axis; ``unsqueeze_dim`` says where to insert it so that they broadcast
    against ``q``/``k`` (1 for ``(batch, heads, seq, dim)``, 2 for ``(batch, seq, heads, dim)``).
    ``x * cos + rotate_half(x) * sin`` (:func:`openspeed.ops.rope.apply_rotary_reference`), or its fused
    path from optimization level 1 on.
    """
    return rope_ops.apply_rotary(q, k, cos, sin, unsqueeze_dim, fast=fused())


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
    return rope_ops.apply_vision_rotary(q, k, cos, sin, fast=fused())


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
