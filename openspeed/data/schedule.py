"""Which samples each optimizer step sees, independent of the data-parallel size.

The global batch of step ``s`` is a fixed slice of a seeded per-epoch permutation; each dp rank takes
a contiguous share of it and splits that into micro-batches. Any layout therefore trains on the
same samples in every step.
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSchedule:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("empty dataset")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perms[epoch] = rng.permutation(self.num_samples)
            else:
                self._perms[epoch] = np.arange(self.num_samples)
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of optimizer step ``step`` (1-based)."""
        start = (step - 1) * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro-batches for ``step``."""
        batch = self.global_batch(step)
        share = len(batch) // dp_size
        mine = batch[dp_rank * share : (dp_rank + 1) * share]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
