"""SwiGLU gating ``silu(gate) * up``: a plain reference and a fast path that saves less for backward.

The reference (what ``models/layers/mlp.py SwiGLUMLP`` computes between its projections) keeps three
tensors of the MLP's hidden size for backward: ``gate`` (for silu's backward), ``silu(gate)`` and ``up``
(for the product's backward). The fast path is a custom autograd Function that keeps only ``gate`` and
``up`` and recomputes ``silu(gate)`` in backward, a third less activation memory for one extra
elementwise pass. It uses the same ATen kernels as autograd does for the reference (``silu``, ``mul``;
``silu_backward``), so its results are bitwise equal in every dtype, and it reuses its own buffers in
place (one allocation fewer in forward, one in backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, differentiated by autograd."""
    return F.silu(gate) * up


class _SwiGLUFunction(torch.autograd.Function):
    """Saves ``gate`` and ``up`` only; ``silu(gate)`` is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        out = F.silu(gate)
        # In place on the fresh silu output: no second full-size temporary. Broadcasting ``up`` to a
        # larger shape than ``gate`` cannot happen in place, so that (unusual) case allocates.
        return out.mul_(up) if out.shape == torch.broadcast_shapes(gate.shape, up.shape) else out * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad_out * up
            full_gate = gate if gate.shape == grad_gate.shape else gate.expand_as(grad_gate)
            # silu_backward written over its own input (elementwise, same positions): one buffer.
            torch.ops.aten.silu_backward.grad_input(grad_gate, full_gate, grad_input=grad_gate)
        if ctx.needs_input_grad[1]:
            silu = F.silu(gate)
            grad_up = silu.mul_(grad_out) if silu.shape == grad_out.shape else grad_out * silu
        return _sum_to(grad_gate, gate), _sum_to(grad_up, up)


def _sum_to(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if grad is None or grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """``silu(gate) * up``. ``fast=True`` keeps only ``gate`` and ``up`` for backward (same values)."""
    if not fast:
        return swiglu_reference(gate, up)
    return _SwiGLUFunction.apply(gate, up)
