"""AdamW with decoupled weight decay and a warmup + cosine (or linear / constant) schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from openspeed.config import MemoryConfig, OptimConfig
from openspeed.ops.adamw import AdamWEMA
from openspeed.ops.level import fused


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, memory: MemoryConfig | None = None, ema_decay: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; norms and biases (1-D tensors) get no weight decay.

    With ``memory.offload_optimizer`` the AdamW state lives (and is updated) in host memory
    (:class:`openspeed.memory.OffloadedAdamW`, MindSpeed's swap optimizer). From optimization level 1
    on, the step is one fused multi-tensor update (:class:`openspeed.ops.adamw.AdamWEMA`), and
    ``ema_decay`` keeps an exponential moving average of the weights inside that step. The updates
    are the same in every case.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if memory is not None and memory.offload_optimizer:
        from openspeed.memory import OffloadedAdamW

        return OffloadedAdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            master_weights=memory.offload_master_weights,
        )
    if fused() or ema_decay is not None:
        return AdamWEMA(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, ema_decay=ema_decay, fast=fused()
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on ``cfg.lr`` for optimizer step ``step`` (0-based: the first update uses step 0)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, max_steps, cfg))


class Optimizers:
    """One AdamW + schedule per model part (pipeline stages are separate modules), stepped together.

    With a single part this is just the optimizer and its schedule. ``per_part[i]`` belongs to
    ``parts[i]``; it is ``None`` for a part without trainable parameters.
    """

    def __init__(
        self, parts: list[nn.Module], cfg: OptimConfig, max_steps: int, memory: MemoryConfig | None = None
    ) -> None:
        self.per_part = [
            build_optimizer(p, cfg, memory) if any(q.requires_grad for q in p.parameters()) else None
            for p in parts
        ]
        self.optimizers = [o for o in self.per_part if o is not None]
        self.schedulers = [build_scheduler(o, max_steps, cfg) for o in self.optimizers]

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"] if self.optimizers else 0.0

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def schedule_step(self) -> None:
        for sched in self.schedulers:
            sched.step()

    def scheduler_state(self) -> dict:
        return self.schedulers[0].state_dict() if self.schedulers else {}

    def load_scheduler_state(self, state: dict) -> None:
        for sched in self.schedulers:
            sched.load_state_dict(state)
