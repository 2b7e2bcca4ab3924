"""Weight initialisation that depends only on (seed, parameter name).

Each parameter's full, unsharded value is generated from its own seeded generator and then the
local shard is copied in, so every parallel layout starts from identical weights.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def param_generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return gen


def initial_value(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """The full fp32 initial value of parameter ``name``.

    1-D ``weight`` parameters are norm scales (ones); biases are zeros; everything else (linear,
    convolution and embedding weights) is normal(0, std).
    """
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and name.endswith("weight"):
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, std, generator=param_generator(seed, name))


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``param``, taking only this rank's shard when it is a DTensor."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the same full value, so no broadcast is needed.
            local = distribute_tensor(
                full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full.to(device=param.device, dtype=param.dtype))


def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """Initialise every parameter of ``model`` (sharded or not) from (seed, name)."""
    for name, param in model.named_parameters():
        copy_full_into(param, initial_value(name, param.shape, seed, std))
