"""The training DeviceMesh: (pp, dp_replicate, dp_shard, cp, tp), always all five named dims."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from openspeed.config import PARALLEL_DIMS
from openspeed.distributed.context_parallel import ContextParallel


@dataclass
class ParallelDims:
    """Sizes of each mesh dimension plus the mesh itself and the groups the trainer needs."""

    sizes: dict[str, int]
    mesh: DeviceMesh
    cp_algo: str = "ulysses"
    cp_ulysses_degree: int | None = None
    _cp: ContextParallel | None = field(default=None, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def _flatten(self, dims: tuple[str, ...], name: str) -> DeviceMesh:
        # A flattened dim is registered on the root mesh once; later calls reuse it.
        if name not in self._flat:
            self._flat[name] = self.mesh[dims]._flatten(name)
        return self._flat[name]

    @property
    def dp_size(self) -> int:
        return self.sizes["dp_replicate"] * self.sizes["dp_shard"]

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def cp_size(self) -> int:
        return self.sizes["cp"]

    @property
    def fsdp_enabled(self) -> bool:
        """Whether parameters are sharded / gradients reduced over more than one rank (dp or cp)."""
        return self.dp_size * self.cp_size > 1

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (replicate-major, as the mesh is laid out)."""
        return self.mesh["dp_replicate"].get_local_rank() * self.sizes["dp_shard"] + self.mesh[
            "dp_shard"
        ].get_local_rank()

    def dp_group(self) -> dist.ProcessGroup:
        """One process group over both data-parallel dims, for token-count and evaluation reductions."""
        return self._flatten(("dp_replicate", "dp_shard"), "dp").get_group()

    def loss_group(self) -> dist.ProcessGroup:
        """The ranks whose partial losses add up to the step's loss: data parallel x context parallel."""
        if self.cp_size == 1:
            return self.dp_group()
        return self._flatten(("dp_replicate", "dp_shard", "cp"), "dp_cp").get_group()

    def context_parallel(self) -> ContextParallel:
        """The cp group with the run's algorithm (built once, collectively, on first use)."""
        if self._cp is None:
            self._cp = ContextParallel.from_mesh(self.mesh["cp"], self.cp_algo, self.cp_ulysses_degree)
        return self._cp

    def dp_mesh(self) -> DeviceMesh:
        """The 2-D mesh FSDP2 replicates (dim 0) and shards (dim 1) over.

        Without context parallelism it is (dp_replicate, dp_shard). With it, the shard dim is
        dp_shard x cp flattened: cp ranks hold different tokens of the same samples, so their
        gradients must be summed like those of data-parallel ranks, and they may as well shard the
        parameters too (torchtitan's ``dp_shard_cp``).
        """
        if self.cp_size == 1:
            return self.mesh["dp_replicate", "dp_shard"]
        self._flatten(("dp_shard", "cp"), "dp_shard_cp")
        return self.mesh["dp_replicate", "dp_shard_cp"]


def build_mesh(
    sizes: dict[str, int], device_type: str, cp_algo: str = "ulysses", cp_ulysses_degree: int | None = None
) -> ParallelDims:
    """Create the 5-D mesh; size-1 dims are kept so every layout uses the same names."""
    shape = tuple(sizes[name] for name in PARALLEL_DIMS)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=PARALLEL_DIMS)
    return ParallelDims(sizes=dict(sizes), mesh=mesh, cp_algo=cp_algo, cp_ulysses_degree=cp_ulysses_degree)
