"""Context parallelism: one attention call split by sequence across a cp process group.

Algorithms (``ContextParallel.algo``), all built on plain collectives (``all_to_all_single``,
``batch_isend_irecv``, ``all_gather``), with custom autograd Functions for an exact backward:

* ``ulysses`` — all-to-all to (whole sequence, head shard), local attention, all-to-all back
  (``ulysses.py``; uneven head counts and GQA with few kv heads supported).
* ``ring`` — K/V blocks passed around the ring, online-softmax merge, flash-style backward (``ring.py``).
* ``hybrid`` — USP: Ulysses inside groups of ``ulysses_degree`` consecutive ranks, ring across them.

Usage::

    cp = ContextParallel.from_mesh(dims.mesh["cp"], "ring")
    x_local = cp.shard(x, dim=1)  # the model's inputs, once; global length a multiple of cp.seq_multiple
    out = context_parallel_attention(q, k, v, cp=cp, causal=True)  # q, k, v: local shards
    full = cp.gather(out_of_model, dim=1)

The layouts (contiguous for Ulysses, zigzag for ring and hybrid) are described in ``group.py``.
``comm_bytes`` / ``reset_comm_bytes`` read the bytes each process sent
(``benchmarks/context_parallel_comm.py`` compares them with the theoretical volumes).
"""

from openspeed.distributed.context_parallel.attention import context_parallel_attention
from openspeed.distributed.context_parallel.comm import comm_bytes, reset_comm_bytes
from openspeed.distributed.context_parallel.group import ALGORITHMS, ContextParallel

__all__ = ["ALGORITHMS", "ContextParallel", "comm_bytes", "context_parallel_attention", "reset_comm_bytes"]
