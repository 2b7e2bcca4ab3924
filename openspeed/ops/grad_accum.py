"""Gradient-accumulation fusion: weight gradients of low-precision linears summed in fp32, in place.

With bf16 weights, autograd produces a bf16 weight gradient per micro-batch and accumulates it into a
bf16 ``.grad``; every addition rounds to 8 bits of mantissa, so small late contributions get lost.
Megatron's ``gradient_accumulation_fusion`` instead gives each weight an fp32 ``main_grad`` buffer and
has the linear's backward add ``grad_out^T @ input`` straight into it (``wgrad_gemm_accum_fp32``).

- Reference (``fast=False`` / plain ``F.linear``): bf16 ``.grad`` per micro-batch, added into
  ``main_grad`` in fp32 outside by :func:`accumulate_into_main_grad`, which then drops ``.grad``.
- Fast path (:func:`linear_with_grad_accumulation`): a custom autograd Function whose backward adds the
  weight gradient into ``weight.main_grad`` itself and returns no weight gradient, so no low-precision
  ``.grad`` is ever materialised. The product is accumulated with fp32 output: where the device has a
  mixed-precision ``addmm(..., out_dtype=float32)`` kernel (CUDA) the low-precision operands go straight
  in; elsewhere (the CPU, whose bf16 GEMM is also slower than fp32 on hardware without AMX) they are
  upcast and ``addmm_`` runs in fp32. Both are at least as exact as the reference, which rounds each
  micro-batch's gradient to bf16 before the fp32 sum.

A bias with a ``main_grad`` gets the same treatment; without one it receives an ordinary gradient.
The buffers belong to plain (non-FSDP) parameters; call :func:`attach_main_grad` once and
:func:`zero_main_grad` after each optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

# (device type, operand dtype) pairs for which ``torch.addmm(..., out_dtype=torch.float32)`` works
# (True) or not (False); probed once each.
_MIXED_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def attach_main_grad(params: Iterable[torch.Tensor]) -> None:
    """Give every parameter that lacks one a zeroed fp32 ``main_grad`` buffer of its shape."""
    for param in params:
        if getattr(param, "main_grad", None) is None:
            param.main_grad = torch.zeros(param.shape, dtype=torch.float32, device=param.device)


def zero_main_grad(params: Iterable[torch.Tensor]) -> None:
    """Zero the ``main_grad`` buffers (after the optimizer step that consumed them)."""
    for param in params:
        buf = getattr(param, "main_grad", None)
        if buf is not None:
            buf.zero_()


def accumulate_into_main_grad(params: Iterable[torch.Tensor]) -> None:
    """Reference accumulation: ``main_grad += grad.float()`` then ``grad = None``, per parameter."""
    for param in params:
        if param.grad is not None and getattr(param, "main_grad", None) is not None:
            param.main_grad.add_(param.grad.float())
            param.grad = None


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
    """``acc (fp32) += a @ b`` in place, accumulating in fp32 without a low-precision product.

    Low-precision ``a``/``b`` go straight into a mixed-precision GEMM where the device has one, and are
    upcast otherwise (on the CPU that is also the faster choice without AMX).
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _mixed_addmm_supported(acc.device, a.dtype):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


class _LinearMainGradFunction(torch.autograd.Function):
    """``F.linear`` whose backward adds the weight (and bias) gradient into ``main_grad`` buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # The Parameters themselves (their ``main_grad`` attributes), not the saved tensors.
        ctx.weight_param, ctx.bias_param = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            addmm_fp32_(ctx.weight_param.main_grad, grad_2d.t(), x.reshape(-1, x.shape[-1]))
        if ctx.bias_param is not None and ctx.needs_input_grad[2]:
            bias_main = getattr(ctx.bias_param, "main_grad", None)
            if bias_main is not None:
                bias_main.add_(grad_2d.sum(0, dtype=torch.float32))
            else:
                grad_bias = grad_2d.sum(0)
        return grad_x, None, grad_bias


def linear_with_grad_accumulation(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fast: bool = True
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with ``fast`` and a ``weight.main_grad`` buffer the weight gradient
    goes into that fp32 buffer instead of ``weight.grad``.

    ``fast=False`` (or no buffer) is plain ``F.linear``; pair it with :func:`accumulate_into_main_grad`.
    """
    if not fast or getattr(weight, "main_grad", None) is None:
        return F.linear(x, weight, bias)
    return _LinearMainGradFunction.apply(x, weight, bias)
