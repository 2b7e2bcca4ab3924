"""The LoRA linear layer and how it is applied, initialised, collected and merged.

A LoRA linear computes ``y = x W^T + b + (alpha / r) * (dropout(x) A^T) B^T`` with ``A`` (r, in) and
``B`` (out, r), as peft's ``lora.Linear`` does: the dropout acts on the adapter branch's input only
(``lora_dropout``; identity in eval mode or at 0). ``B`` starts at zero, so an adapted model starts
equal to its base model.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from openspeed.errors import ConfigError

LORA_PARAM_MARKERS = (".lora_A.", ".lora_B.")


class LoRALinear(nn.Module):
    """A linear layer with a low-rank update; keeps the wrapped layer's ``weight`` and ``bias``.

    Args:
        base: the ``nn.Linear`` to adapt (its parameters are taken over, not copied; may be on meta).
        rank: adapter rank ``r``.
        alpha: scaling numerator (``scale = alpha / rank``); ``None`` means ``rank``.
        dropout: dropout probability on the adapter branch's input (peft's ``lora_dropout``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.dropout = float(dropout)
        self.lora_dropout = nn.Dropout(self.dropout) if self.dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the scaled low-rank update of the (dropped-out) input."""
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` (out, in): what merging adds to ``weight``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}")
        return text + (f", dropout={self.dropout:g}" if self.dropout else "")


def matches(name: str, patterns: Iterable[str], aliases: Iterable[str] = ()) -> bool:
    """Whether a module ``name`` (or one of its ``aliases``) matches a pattern.

    A pattern matches a name it equals, a name it ends (after a dot, as peft's ``target_modules``), or a
    glob over the whole name (``*`` crosses dots): ``q_proj``, ``self_attn.*_proj``, ``blocks.1.*``.
    """
    names = [name, *aliases]
    for pattern in patterns:
        for candidate in names:
            if fnmatch.fnmatchcase(candidate, pattern) or fnmatch.fnmatchcase(candidate, "*." + pattern):
                return True
    return False


def apply_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float | None = None,
    alias: Callable[[str], str] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``targets`` with a :class:`LoRALinear`, in place.

    ``dropout`` is the adapters' input dropout (peft's ``lora_dropout``). ``alias`` maps a module name
    to another spelling also matched (e.g. diffusers' or Hugging Face names of a native model). Works on
    the meta device. Returns the adapted module names; a pattern that matches no linear layer is a
    ``ConfigError``.
    """
    targets = list(targets)
    chosen = []
    used: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        aliases = [alias(name)] if alias is not None else []
        hits = [p for p in targets if matches(name, [p], aliases)]
        if hits:
            chosen.append(name)
            used.update(hits)
    unused = [p for p in targets if p not in used]
    if unused:
        raise ConfigError(f"model.lora.targets: '{unused[0]}' matches no linear layer of the model")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_view(model: nn.Module) -> nn.Module:
    """A module that holds ``model``'s adapter layers (the same objects, not copies) under their names.

    Its parameters are exactly the adapters', named as in ``model`` (``<module>.lora_A.weight``), so
    ``state_dict`` / DCP / optimizer state dicts over it cover the adapters alone: what an
    adapter-only checkpoint saves and loads. Sharded (DTensor) adapters stay sharded.
    """
    view = nn.Module()
    for name, module in lora_modules(model).items():
        holder = view
        for part in name.split("."):
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        holder.add_module("lora_A", module.lora_A)
        holder.add_module("lora_B", module.lora_B)
    return view


def is_lora_param(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (``...lora_A.weight`` / ``...lora_B.weight``)."""
    return any(marker in f".{name}" for marker in LORA_PARAM_MARKERS)


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter but the adapters'; returns the number of trainable elements."""
    trainable = 0
    for name, param in model.named_parameters():
        keep = is_lora_param(name)
        param.requires_grad_(keep)
        trainable += param.numel() if keep else 0
    return trainable


def init_lora(model: nn.Module, seed: int) -> None:
    """Initialise adapters as peft does: ``A`` uniform in +-1/sqrt(in) (Kaiming, a=sqrt(5)), ``B`` zero.

    ``A`` is drawn from (seed, parameter name) on its full shape, so sharded models start identical.
    """
    from openspeed.models.init import copy_full_into, param_generator

    for name, module in lora_modules(model).items():
        a_name = f"{name}.lora_A.weight"
        bound = 1.0 / math.sqrt(module.in_features)
        full = torch.empty(module.rank, module.in_features).uniform_(
            -bound, bound, generator=param_generator(seed, a_name)
        )
        copy_full_into(module.lora_A.weight, full)
        copy_full_into(module.lora_B.weight, torch.zeros(module.out_features, module.rank))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) adapter tensors by parameter name, on the CPU.

    Under FSDP every rank must call this (each DTensor is gathered).
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if is_lora_param(name):
            value = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = value.detach().to("cpu", torch.float32).clone()
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain ``nn.Linear`` back, in place.

    The merged model's state dict has exactly the base model's names.
    """
    for name, module in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = module.weight
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight + module.delta_weight().to(weight.dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        setattr(parent, child, linear)
    return model


__all__ = [
    "LoRALinear",
    "adapter_view",
    "apply_lora",
    "init_lora",
    "is_lora_param",
    "lora_modules",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "matches",
    "merge_lora",
]
