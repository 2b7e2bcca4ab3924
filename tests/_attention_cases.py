"""What attention tests share: the sequences a padded / packed layout holds."""

from __future__ import annotations

import torch


def sequences(batch: int, seq: int, mask, cu_seqlens) -> list[tuple[int, torch.Tensor]]:
    """``(row, real token indices)`` of every non-empty sequence of the layout (host tensors)."""
    bounds = [0, seq] if cu_seqlens is None else cu_seqlens.tolist()
    out = []
    for row in range(batch):
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = torch.arange(a, b)
            if mask is not None:
                idx = idx[mask[row, a:b].cpu().bool()]
            if idx.numel():
                out.append((row, idx))
    return out
