"""The training DeviceMesh: (pp, dp_replicate, dp_shard, cp, tp), always all five named dims."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from openspeed.config import PARALLEL_DIMS


@dataclass
class ParallelDims:
    """Sizes of each mesh dimension plus the mesh itself and the groups the trainer needs."""

    sizes: dict[str, int]
    mesh: DeviceMesh

    @property
    def dp_size(self) -> int:
        return self.sizes["dp_replicate"] * self.sizes["dp_shard"]

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (replicate-major, as the mesh is laid out)."""
        return self.mesh["dp_replicate"].get_local_rank() * self.sizes["dp_shard"] + self.mesh[
            "dp_shard"
        ].get_local_rank()

    def dp_group(self) -> dist.ProcessGroup:
        """One process group over both data-parallel dims, for loss/token-count reductions."""
        return self.mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()

    def dp_mesh(self) -> DeviceMesh:
        """The 2-D (dp_replicate, dp_shard) mesh FSDP2 shards and replicates over."""
        return self.mesh["dp_replicate", "dp_shard"]


def build_mesh(sizes: dict[str, int], device_type: str) -> ParallelDims:
    """Create the 5-D mesh; size-1 dims are kept so every layout uses the same names."""
    shape = tuple(sizes[name] for name in PARALLEL_DIMS)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=PARALLEL_DIMS)
    return ParallelDims(sizes=dict(sizes), mesh=mesh)
