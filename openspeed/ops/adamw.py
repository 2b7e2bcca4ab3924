"""AdamW with an exponential moving average (EMA) of the weights, as DiT training keeps one.

:class:`AdamWEMA` updates parameters exactly as ``torch.optim.AdamW`` (decoupled weight decay, bias
correction, no amsgrad) and, when ``ema_decay`` is set, keeps ``ema = decay * ema + (1 - decay) * param``
after every step, starting from the parameter's value at its first step. EMA buffers of bf16/fp16
parameters are kept in fp32 (with a decay like 0.9999 a low-precision EMA would never move).

- ``fast=False`` (reference): a per-parameter loop with the single-tensor AdamW math, then a separate
  loop updating the EMAs.
- ``fast=True``: per (device, dtype) group, ``torch._fused_adamw_`` where the device has the fused
  kernel (the CPU and CUDA in current torch), else ``torch._foreach_*`` ops; the EMAs are updated inside
  the same step with one ``torch._foreach_lerp_`` per group.

The EMA lives in the optimizer state (key ``"ema"``), so ``state_dict()`` / ``load_state_dict()`` carry it;
loading keeps each EMA in its own dtype. :meth:`AdamWEMA.ema_weights` swaps the EMA into the parameters
for evaluation or sampling.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from openspeed.errors import ConfigError

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _ema_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


class AdamWEMA(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW`` update) with an optional EMA of the parameters in its state.

    ``ema_decay`` may be set per param group; ``None`` (or 0) keeps no EMA for that group.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        ema_decay: float | None = None,
        fast: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ema_decay=ema_decay)
        super().__init__(params, defaults)
        self.fast = fast
        for group in self.param_groups:
            _check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # -- state ------------------------------------------------------------------------------------

    def _init_state(self, group: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            # A float32 scalar step, as torch.optim.AdamW keeps; on the parameter's device so the fused
            # kernel can read it there.
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["ema_decay"] and "ema" not in state:
            state["ema"] = param.detach().to(_ema_dtype(param), copy=True)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep each EMA in its own (e.g. fp32) dtype."""
        emas = {pid: s["ema"] for pid, s in state_dict["state"].items() if "ema" in s}
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            if pid in emas:
                self.state[param]["ema"] = emas[pid].to(
                    device=param.device, dtype=_ema_dtype(param), copy=True
                )
            if "step" in self.state[param]:
                self.state[param]["step"] = self.state[param]["step"].to(param.device, torch.float32)

    def ema(self, param: torch.Tensor) -> torch.Tensor | None:
        """The EMA of ``param`` (None before its first step or without ``ema_decay``)."""
        return self.state[param].get("ema") if param in self.state else None

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the parameters hold their EMA values; the trained values come back after."""
        swapped = []
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    ema = self.ema(param)
                    if ema is not None:
                        swapped.append((param, param.detach().clone()))
                        param.copy_(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in swapped:
                    param.copy_(value)

    # -- step -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW step over every parameter with a gradient, then the EMA update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWEMA does not support sparse gradients")
            states = [self._init_state(group, p) for p in params]
            if self.fast:
                _fast_group_step(group, params, states)
            else:
                _reference_group_step(group, params, states)
        return loss


def _check_group(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    if not group["lr"] >= 0.0:
        raise ConfigError(f"optimizer lr must be >= 0, got {group['lr']}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ConfigError(f"optimizer betas must be in [0, 1), got {group['betas']}")
    if not group["eps"] >= 0.0:
        raise ConfigError(f"optimizer eps must be >= 0, got {group['eps']}")
    if not group["weight_decay"] >= 0.0:
        raise ConfigError(f"optimizer weight_decay must be >= 0, got {group['weight_decay']}")
    decay = group["ema_decay"]
    if decay is not None and not 0.0 <= decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1) or null, got {decay}")


def _reference_group_step(group: dict[str, Any], params: list[torch.Tensor], states: list[dict]) -> None:
    """``torch.optim.AdamW``'s single-tensor update, one parameter at a time; then the EMAs."""
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    for param, state in zip(params, states):
        grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = state["step"].item()
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
    decay = group["ema_decay"]
    if decay:
        for param, state in zip(params, states):
            state["ema"].lerp_(param.to(state["ema"].dtype), 1 - decay)


def _has_fused_adamw(device: torch.device, dtype: torch.dtype) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return (
        hasattr(torch, "_fused_adamw_")
        and device.type in _get_fused_kernels_supported_devices()
        and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )


def _fast_group_step(group: dict[str, Any], params: list[torch.Tensor], states: list[dict]) -> None:
    """Fused (or multi-tensor) AdamW per (device, dtype) group, the EMA lerp right after it."""
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    decay = group["ema_decay"]
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for (device, dtype), index in buckets.items():
        ps = [params[i] for i in index]
        grads = [p.grad for p in ps]
        exp_avgs = [states[i]["exp_avg"] for i in index]
        exp_avg_sqs = [states[i]["exp_avg_sq"] for i in index]
        steps = [states[i]["step"] for i in index]
        torch._foreach_add_(steps, 1)
        if _has_fused_adamw(device, dtype):
            torch._fused_adamw_(
                ps,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
        else:
            _foreach_adamw(ps, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay)
        if decay:
            emas = [states[i]["ema"] for i in index]
            sources = ps if emas[0].dtype == dtype else [p.to(emas[0].dtype) for p in ps]
            torch._foreach_lerp_(emas, sources, 1 - decay)


def _foreach_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The AdamW update with multi-tensor ops (steps already incremented)."""
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_values = [s.item() for s in steps]
    step_sizes = [-lr / (1 - beta1**step) for step in step_values]
    bias_correction2_sqrt = [math.sqrt(1 - beta2**step) for step in step_values]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
