"""Communication volume and time of one context-parallel attention call (forward + backward).

Run: ``python -m benchmarks.context_parallel_comm`` (options: ``--seq``, ``--heads``, ``--head-dim``,
``--repeats``). It spawns gloo worlds of cp = 2 and 4 CPU processes (one thread each), runs forward +
backward of one causal attention call per algorithm on a fixed fp32 shape, and prints a Markdown table:
the bytes each rank sent (the counters of ``openspeed.distributed.context_parallel.comm``) beside the
theoretical volume, and the slowest rank's wall time as a ratio to one-process SDPA (cp = 1, one thread).

Theoretical bytes sent per rank per call (forward + backward), batch ``B``, global sequence ``S``, head
dim ``D``, ``Hq`` query and ``Hkv`` key/value heads (both multiples of the Ulysses degree), element size
``e``, cp size ``c``, and ``N = B * (S / c) * D * e`` (one head of one rank's sequence shard):

* Ulysses (``U = c``): each all-to-all keeps ``1/c`` of its input and sends the rest. Forward moves q, k, v
  out and the output back, backward the output gradient out and dq, dk, dv back:
  ``4 (c-1)/c (Hq + Hkv) N``.
* Ring (``R = c``): ``R - 1`` K/V hops forward (``2 Hkv N`` each), ``R - 1`` K/V hops again in the backward,
  and ``R - 1`` hops of the fp32 dK/dV accumulator (``2 Hkv N * 4/e``): ``(4 + 8/e)(R-1) Hkv N``, i.e.
  ``6 (c-1) Hkv N`` in fp32.
* Hybrid (``U x R = c``): Ulysses over groups of ``U`` (``4 (U-1)/U (Hq + Hkv) N``) plus a ring of ``R`` whose
  K/V blocks hold ``Hkv / U`` heads of ``S / R`` tokens, again ``2 Hkv N`` bytes:
  ``4 (U-1)/U (Hq + Hkv) N + (4 + 8/e)(R-1) Hkv N``.

Ulysses' volume per rank shrinks as ``1/c`` with the shard, the ring's does not (it moves all other K/V
through every rank) but overlaps with compute; the hybrid trades between them. A padding mask adds an
all-gather of ``(c-1) B S / c`` bytes (uint8); none is used here. On a machine with fewer cores than
processes the time ratios include the processes' competition for cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.machine import commit

ALGOS = {2: [("ulysses", None), ("ring", None)], 4: [("ulysses", None), ("ring", None), ("hybrid", 2)]}


def _inputs(args, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, args.heads, args.seq, args.head_dim)
    return [torch.randn(shape, generator=gen) for _ in range(4)]  # q, k, v, dout


def _theory(algo: str, cp: int, ulysses: int | None, args) -> tuple[int, str]:
    """(bytes, formula) of the module docstring for MHA (Hq = Hkv = H) in fp32 (e = 4)."""
    heads, elem = args.heads, 4
    n = args.seq // cp * args.head_dim * elem
    if algo == "ulysses":
        return 4 * (cp - 1) * 2 * heads * n // cp, "4(c-1)/c·(Hq+Hkv)·N"
    if algo == "ring":
        return (4 + 8 // elem) * (cp - 1) * heads * n, "6(c-1)·Hkv·N"
    ring = cp // ulysses
    volume = 4 * (ulysses - 1) * 2 * heads * n // ulysses + (4 + 8 // elem) * (ring - 1) * heads * n
    return volume, "4(U-1)/U·(Hq+Hkv)·N + 6(R-1)·Hkv·N"


def _sdpa_seconds(args) -> float:
    torch.set_num_threads(1)
    q, k, v, dout = _inputs(args)
    times = []
    for _ in range(args.repeats + 1):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        start = time.perf_counter()
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).backward(dout)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    import torch.distributed as dist

    from openspeed.distributed.context_parallel import (
        ContextParallel,
        comm_bytes,
        context_parallel_attention,
        reset_comm_bytes,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = []
        q, k, v, dout = _inputs(args)
        for algo, ulysses in ALGOS[world]:
            cp = ContextParallel.from_group(dist.group.WORLD, algo, ulysses)
            local = [cp.shard(t, 2) for t in (q, k, v, dout)]
            times, sent = [], None
            for _ in range(args.repeats + 1):
                lq, lk, lv = (t.clone().requires_grad_() for t in local[:3])
                dist.barrier()
                reset_comm_bytes()
                start = time.perf_counter()
                context_parallel_attention(lq, lk, lv, cp=cp, causal=True).backward(local[3])
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                sent = comm_bytes()["total"]
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the call takes as long as its slowest rank
                times.append(float(elapsed))
            counts = torch.tensor([sent], dtype=torch.float64)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            low = torch.tensor([sent], dtype=torch.float64)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            rows.append(
                {
                    "algo": algo, "cp": world, "ulysses": ulysses,
                    "bytes_max": int(counts), "bytes_min": int(low), "seconds": min(times[1:]),
                }
            )
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as fh:
                json.dump(rows, fh)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, port, args, out_path), nprocs=world, join=True)
        with open(out_path, encoding="utf-8") as fh:
            return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    baseline = _sdpa_seconds(args)
    rows = [row for world in ALGOS for row in _spawn(world, args)]
    print(
        f"Context-parallel attention, causal, fp32, batch 1, {args.heads} heads (MHA), head_dim "
        f"{args.head_dim}, seq {args.seq}; forward + backward of one call.\n"
        f"Host: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, commit {commit()}, "
        f"gloo, one thread per process; command: python -m benchmarks.context_parallel_comm "
        f"--seq {args.seq} --heads {args.heads} --head-dim {args.head_dim} --repeats {args.repeats}.\n"
        f"N = B·(S/c)·D·e = one head of one rank's shard; "
        f"cp=1 SDPA forward + backward: {baseline:.3f} s.\n"
    )
    print("| algorithm | cp | U x R | sent per rank (measured) | theoretical | formula | time / SDPA cp=1 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ulysses = row["ulysses"] or (row["cp"] if row["algo"] == "ulysses" else 1)
        theory, formula = _theory(row["algo"], row["cp"], ulysses, args)
        measured = f"{row['bytes_max'] / 2**20:.2f} MiB"
        if row["bytes_min"] != row["bytes_max"]:
            measured = f"{row['bytes_min'] / 2**20:.2f}-{measured}"
        print(
            f"| {row['algo']} | {row['cp']} | {ulysses} x {row['cp'] // ulysses} | {measured} "
            f"| {theory / 2**20:.2f} MiB | {formula} | {row['seconds'] / baseline:.2f} |"
        )


if __name__ == "__main__":
    main()
