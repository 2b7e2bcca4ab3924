"""Exponential moving average of the trained weights (``train.ema_decay``), for every model family.

:class:`WeightEMA` keeps ``ema = decay * ema + (1 - decay) * p`` of each trainable parameter, updated
after every optimizer step. The averages are buffers named ``ema/<parameter name with / for .>``
(shards of the same layout as the parameters under FSDP), so they go into the run's DCP checkpoints
beside the model and any layout can resume them; :func:`load_ema_weights` puts them into a plain
model for export or sampling.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

EMA_PREFIX = "ema/"
# Top-level key of the model state in the checkpoints ``save_checkpoint`` writes.
_MODEL_KEY = "model"


class WeightEMA(nn.Module):
    """EMA of ``model``'s trainable parameters (one ``lerp_`` per tensor, fp32 averages)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self._pairs: list[tuple[str, nn.Parameter]] = []
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = EMA_PREFIX + name.replace(".", "/")
                self.register_buffer(key, param.detach().clone().float())
                self._pairs.append((key, param))

    @torch.no_grad()
    def update(self) -> None:
        for key, param in self._pairs:
            self._buffers[key].lerp_(param.detach().float(), 1.0 - self.decay)


def ema_keys(checkpoint: str) -> set[str]:
    """The checkpoint's EMA entries (empty when the run kept none)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    return {k for k in metadata.state_dict_metadata if k.startswith(f"{_MODEL_KEY}.{EMA_PREFIX}")}


def load_ema_weights(model: nn.Module, checkpoint: str) -> int:
    """Replace ``model``'s parameters that have an EMA in ``checkpoint`` by it (plain model, no
    process group); returns how many were replaced."""
    import torch.distributed.checkpoint as dcp

    available = ema_keys(checkpoint)
    wanted = {}
    for name, param in model.named_parameters():
        key = f"{_MODEL_KEY}.{EMA_PREFIX}{name.replace('.', '/')}"
        if key in available:
            wanted[key] = torch.empty_like(param, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, checkpoint_id=checkpoint, no_dist=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in wanted.items():
            params[key[len(f"{_MODEL_KEY}.{EMA_PREFIX}"):].replace("/", ".")].copy_(value)
    return len(wanted)


__all__ = ["EMA_PREFIX", "WeightEMA", "ema_keys", "load_ema_weights"]
