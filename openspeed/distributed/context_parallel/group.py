"""``ContextParallel``: a cp process group, its algorithm, and which tokens each rank holds.

Layout (the same for causal and full attention, so a model shards its inputs once):

* ``ulysses``: contiguous. Rank ``r`` of ``c`` holds global positions ``[r*S/c, (r+1)*S/c)``; after the
  all-to-all every rank sees the whole sequence in global order. ``seq_multiple = c``.
* ``ring``: zigzag ("head-tail"). The sequence is cut into ``2c`` chunks; rank ``r`` holds chunks ``r``
  and ``2c-1-r`` (in that order), so under causal masking every rank does the same work.
  ``seq_multiple = 2c``.
* ``hybrid`` (USP): the ``c`` ranks form ``R = c / U`` groups of ``U = ulysses_degree`` consecutive ranks.
  Group ``g`` holds the zigzag chunks ``g`` and ``2R-1-g`` of a ``2R``-chunk cut (its tokens, in that
  order, are what the Ulysses all-to-all assembles), and member ``u`` holds the ``u``-th contiguous
  ``1/U`` of them. ``seq_multiple = 2c``. With ``R = 1`` this is exactly the Ulysses layout and with
  ``U = 1`` exactly the ring layout, which is how the code treats the three algorithms: Ulysses
  inside groups of ``U`` ranks, a ring of ``R`` groups across them.

Every rank's local order keeps positions increasing; masks are computed from global positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from openspeed.distributed.context_parallel import comm
from openspeed.errors import ConfigError

ALGORITHMS = ("ulysses", "ring", "hybrid")

# Ulysses sub-groups made by ``from_group`` (keyed by global ranks), so building a second
# ContextParallel over the same ranks does not create the group again.
_SUBGROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _degrees(algo: str, size: int, ulysses_degree: int | None) -> tuple[int, int]:
    """``(U, R)``: the Ulysses group size and the ring size, checked against the cp size."""
    if algo not in ALGORITHMS:
        raise ConfigError(f"context parallel algorithm must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    if algo == "ulysses":
        if ulysses_degree not in (None, size):
            raise ConfigError(
                f"context parallel ulysses_degree={ulysses_degree} must equal the cp size {size} "
                "for algo 'ulysses'"
            )
        return size, 1
    if algo == "ring":
        if ulysses_degree not in (None, 1):
            raise ConfigError(
                f"context parallel ulysses_degree={ulysses_degree} has no meaning for algo 'ring' "
                "(use 'hybrid')"
            )
        return 1, size
    if ulysses_degree is None:
        raise ConfigError("context parallel algo 'hybrid' needs ulysses_degree")
    if ulysses_degree < 1 or size % ulysses_degree != 0:
        raise ConfigError(
            f"context parallel ulysses_degree={ulysses_degree} does not divide the cp size {size}"
        )
    return ulysses_degree, size // ulysses_degree


class ContextParallel:
    """A cp group and its algorithm. algo: 'ulysses' | 'ring' | 'hybrid' (hybrid = Ulysses inside groups
    of ``ulysses_degree`` consecutive ranks x ring across those groups).

    Build with ``from_group`` or ``from_mesh`` on every rank of the group at the same time.

    Attributes:
        size, rank: the cp group size and this rank in it.
        algo: the algorithm name.
        ulysses_size, ring_size: ``U`` and ``R`` (``U * R == size``); ``ulysses_rank``, ``ring_rank``.
        seq_multiple: the global sequence length must be a multiple of this.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        algo: str,
        ulysses_degree: int | None,
        ulysses_group: dist.ProcessGroup | None,
    ):
        self.group = group
        self.algo = algo
        self.size = group.size()
        self.rank = group.rank()
        self.ulysses_size, self.ring_size = _degrees(algo, self.size, ulysses_degree)
        self.ulysses_rank = self.rank % self.ulysses_size
        self.ring_rank = self.rank // self.ulysses_size
        self.ulysses_group = ulysses_group
        if ulysses_group is not None and ulysses_group.rank() != self.ulysses_rank:
            raise RuntimeError(
                f"cp rank {self.rank}: Ulysses sub-group rank {ulysses_group.rank()} "
                f"is not {self.ulysses_rank}"
            )
        # Ring neighbours (cp group ranks): the same Ulysses slot in the next / previous group.
        step = self.ulysses_size
        self.ring = comm.RingExchange(
            group,
            next_rank=((self.ring_rank + 1) % self.ring_size) * step + self.ulysses_rank,
            prev_rank=((self.ring_rank - 1) % self.ring_size) * step + self.ulysses_rank,
        )
        self.seq_multiple = self.size if self.ring_size == 1 else 2 * self.size

    @classmethod
    def from_group(
        cls, group: dist.ProcessGroup, algo: str, ulysses_degree: int | None = None
    ) -> ContextParallel:
        """From a process group; call on every rank of ``group``.

        For 'hybrid' the Ulysses sub-groups are created with
        ``dist.new_group(use_local_synchronization=True)``, so only the cp group's members take part.
        torch names such a group after its ranks and the number of groups the process already has, so
        the members must have created the same number of groups before (true when every rank builds the
        same layout). ``from_mesh`` has no such condition.
        """
        size = group.size()
        ulysses, _ = _degrees(algo, size, ulysses_degree)
        if ulysses == size:
            sub = group
        elif ulysses == 1:
            sub = None
        else:
            ranks = dist.get_process_group_ranks(group)
            first = (group.rank() // ulysses) * ulysses
            mine = tuple(ranks[first : first + ulysses])
            if mine not in _SUBGROUPS:
                _SUBGROUPS[mine] = dist.new_group(
                    list(mine), use_local_synchronization=True, group_desc="cp_ulysses", sort_ranks=False
                )
            sub = _SUBGROUPS[mine]
        return cls(group, algo, ulysses_degree, sub)

    @classmethod
    def from_mesh(cls, mesh, algo: str, ulysses_degree: int | None = None) -> ContextParallel:
        """From a 1-D DeviceMesh (e.g. ``dims.mesh["cp"]``); call on every rank of the root mesh.

        For 'hybrid' the mesh is unflattened into (ring, ulysses) dims, which creates the sub-groups
        collectively over the whole mesh."""
        if mesh.ndim != 1:
            raise ValueError(f"ContextParallel.from_mesh needs a 1-D mesh, got {mesh.ndim} dims")
        group = mesh.get_group()
        size = group.size()
        ulysses, ring = _degrees(algo, size, ulysses_degree)
        if ulysses == size:
            sub = group
        elif ulysses == 1:
            sub = None
        else:
            name = (mesh.mesh_dim_names or ("cp",))[0]
            names = (f"{name}_ring", f"{name}_ulysses")
            sub = mesh._unflatten(0, (ring, ulysses), names).get_group(names[1])
        return cls(group, algo, ulysses_degree, sub)

    def __repr__(self) -> str:
        return (
            f"ContextParallel(algo={self.algo!r}, size={self.size}, rank={self.rank}, "
            f"ulysses={self.ulysses_size}, ring={self.ring_size})"
        )

    # ----------------------------------------------------------------------------------------------
    # Layout
    # ----------------------------------------------------------------------------------------------

    def check_seq_len(self, seq_len: int) -> None:
        """One-line error unless ``seq_len`` can be split by this layout."""
        if seq_len % self.seq_multiple != 0:
            raise ValueError(
                f"context parallel {self.algo} over {self.size} ranks needs the sequence length to be a "
                f"multiple of {self.seq_multiple}, got {seq_len}"
            )

    def group_positions(self, ring_rank: int, seq_len: int) -> torch.Tensor:
        """Global positions held by Ulysses group ``ring_rank`` (all its members' tokens, in order)."""
        if self.ring_size == 1:
            return torch.arange(seq_len)
        chunk = seq_len // (2 * self.ring_size)
        head = torch.arange(ring_rank * chunk, (ring_rank + 1) * chunk)
        tail_start = (2 * self.ring_size - 1 - ring_rank) * chunk
        return torch.cat([head, torch.arange(tail_start, tail_start + chunk)])

    def rank_positions(self, rank: int, seq_len: int) -> torch.Tensor:
        """Global positions cp rank ``rank`` holds, in its local order."""
        self.check_seq_len(seq_len)
        local = seq_len // self.size
        group = self.group_positions(rank // self.ulysses_size, seq_len)
        start = (rank % self.ulysses_size) * local
        return group[start : start + local]

    def local_indices(self, seq_len: int) -> torch.Tensor:
        """Global positions (0..seq_len-1) this rank holds, in local order."""
        return self.rank_positions(self.rank, seq_len)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of the global tensor ``x`` along ``dim`` (no communication)."""
        return x.index_select(dim, self.local_indices(x.shape[dim]).to(x.device))

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather the local shards along ``dim`` into the global tensor, in global order.

        Autograd: the backward takes this rank's slice of the incoming gradient (the gathered tensor is
        assumed to be used identically on every rank, e.g. a replicated loss).
        """
        return _Gather.apply(x, self, dim)

    def gather_key_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The global ``(batch, seq)`` bool key mask from each rank's local ``attention_mask``."""
        mask = attention_mask.to(torch.uint8)  # gloo has no bool all-gather
        seq_len = mask.shape[1] * self.size
        parts = comm.all_gather(mask, self.group)
        full = torch.empty(mask.shape[0], seq_len, dtype=torch.bool, device=mask.device)
        for rank, part in enumerate(parts):
            full[:, self.rank_positions(rank, seq_len).to(mask.device)] = part.bool()
        return full


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextParallel, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        seq_len = x.shape[dim] * cp.size
        ctx.cp, ctx.dim, ctx.seq_len = cp, dim, seq_len
        parts = comm.all_gather(x, cp.group)
        positions = torch.cat([cp.rank_positions(r, seq_len) for r in range(cp.size)]).to(x.device)
        out = torch.empty(
            (*x.shape[:dim], seq_len, *x.shape[dim + 1 :]), dtype=x.dtype, device=x.device
        )
        return out.index_copy_(dim, positions, torch.cat(parts, dim))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        own = ctx.cp.local_indices(ctx.seq_len).to(grad.device)
        return grad.index_select(ctx.dim, own), None, None
