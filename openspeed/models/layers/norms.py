"""Normalisation layers shared by the native models."""

from __future__ import annotations

import torch
from torch import nn

from openspeed.ops.level import fused
from openspeed.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-channel scale.

    The statistics are computed in fp32 whatever the input dtype, and the normalised value is cast back
    to the input dtype *before* the scale is applied. That order matches the Hugging Face Qwen/Llama
    implementation, so bf16 runs round the same way as the reference.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` over its last dimension (:func:`openspeed.ops.rms_norm.rms_norm_reference`,
        or its fused path from optimization level 1 on)."""
        return rms_norm(x, self.weight, self.eps, fast=fused())

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
