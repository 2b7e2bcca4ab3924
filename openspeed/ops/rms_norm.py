"""RMSNorm: a plain reference and a fast path that saves less for backward.

Both follow the Hugging Face Qwen/Llama cast order that ``models/layers/norms.py`` implements: the
statistics and the normalisation run in fp32, the normalised value is cast back to the input dtype,
and only then is it multiplied by the weight (so the result has the promoted dtype of the weight and
the input, as in the reference).

The reference, differentiated by autograd, keeps an fp32 copy of the input, the fp32 rstd and the
cast normalised value alive until backward. The fast path is a custom autograd Function that keeps
only the input (in its own dtype) and the per-row fp32 rstd; backward recomputes the normalised value
from them. Where PyTorch has the private ``aten::_fused_rms_norm`` kernels (torch >= 2.8), forward and
the input gradient use them (one pass each; the backward kernel exists on CUDA but not on the CPU);
otherwise the same math runs in plain PyTorch.

DTensor inputs (sequence-parallel norms) and code being compiled (``train.compile``) take the
reference path. The fast path's backward is not
itself differentiable (no double backward).
"""

from __future__ import annotations

import torch

_HAS_FUSED_FORWARD = hasattr(torch.ops.aten, "_fused_rms_norm")
_HAS_FUSED_BACKWARD = hasattr(torch.ops.aten, "_fused_rms_norm_backward")
# Device types on which ``_fused_rms_norm_backward`` turned out to have no kernel (e.g. the CPU in
# torch 2.13); filled on first use so the probe costs one failed call per device type.
_NO_FUSED_BACKWARD: set[str] = set()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dimension, exactly as ``models.layers.norms.RMSNorm``."""
    input_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype)


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised ``x`` cast to ``x.dtype`` and the fp32 rstd of shape ``(..., 1)``."""
    if _HAS_FUSED_FORWARD:
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd).to(x.dtype), rstd


def _normalize_backward(
    grad_normed: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, x_hat: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient wrt ``x`` of the fp32 normalisation, given the gradient wrt the normalised value.

    ``x_hat`` is the fp32 normalised ``x`` when the caller already has it.
    """
    if _HAS_FUSED_BACKWARD and x.device.type not in _NO_FUSED_BACKWARD:
        try:
            grad_x, _ = torch.ops.aten._fused_rms_norm_backward(
                grad_normed, x, [x.shape[-1]], rstd, None, [True, False]
            )
            return grad_x
        except NotImplementedError:
            _NO_FUSED_BACKWARD.add(x.device.type)
    # d/dx (x * r) with r = rsqrt(mean(x^2) + eps) is  r * (g - x_hat * mean(g * x_hat)),  x_hat = x * r.
    hidden = x.shape[-1]
    g32 = grad_normed.float()
    if x_hat is None:
        x_hat = x.float() * rstd
    # Row-wise dot products as a batched (1 x H) @ (H x 1) product: no temporary of x's size.
    dot = torch.bmm(g32.reshape(-1, 1, hidden), x_hat.reshape(-1, hidden, 1)).reshape(rstd.shape)
    return torch.addcmul(g32, x_hat, dot, value=-1.0 / hidden).mul_(rstd).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """Saves the input and the fp32 rstd; recomputes the normalised value in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = _normalize(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        x_hat = x.float() * rstd if ctx.needs_input_grad[1] else None  # recomputed fp32 normalised x
        if ctx.needs_input_grad[1]:
            normed = x_hat.to(x.dtype)
            # Same reduction as autograd's broadcast of ``weight * normed``: sum over the leading dims.
            grad_weight = (grad_out * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # The reference rounds the gradient of the normalised value to the input dtype (the
            # backward of its ``.to(input_dtype)``) before the fp32 normalisation backward.
            grad_normed = (grad_out * weight).to(x.dtype)
            grad_x = _normalize_backward(grad_normed, x, rstd, x_hat)
        return grad_x, grad_weight, None


def _plain_tensors(*tensors: torch.Tensor) -> bool:
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, fast: bool = True) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension with the per-channel scale ``weight``.

    ``fast=False`` runs :func:`rms_norm_reference`. ``fast=True`` gives the same values (fp32 within
    rounding; low precision within the input dtype's rounding) while keeping only ``x`` and an fp32
    ``rstd`` per row for backward.
    """
    if not fast or not _plain_tensors(x, weight) or torch.compiler.is_compiling():
        # Inside torch.compile the plain math is traced instead: the compiler fuses it and chooses
        # what to save itself (and a private kernel a device lacks is never baked into a graph).
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)
