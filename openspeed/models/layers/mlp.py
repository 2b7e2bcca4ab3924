"""Feed-forward blocks shared by the native models."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from openspeed.errors import ConfigError
from openspeed.ops.level import fused
from openspeed.ops.swiglu import swiglu


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "quick_gelu": _quick_gelu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation function called ``name`` (Hugging Face ``hidden_act`` spelling)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        known = ", ".join(sorted(_ACTIVATIONS))
        raise ConfigError(f"activation '{name}' is not supported (known: {known})") from None


class SwiGLUMLP(nn.Module):
    """Gated feed-forward block: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, bias: bool, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act_name = act
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to the last dimension of ``x``.

        With SiLU, from optimization level 1 on, ``silu(gate) * up`` is one fused op that keeps only
        its two inputs for backward.
        """
        if self.act is F.silu and fused():
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"
