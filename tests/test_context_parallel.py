"""Context-parallel attention (Ulysses, ring, hybrid) must equal one-process SDPA, forward and backward.

Two gloo worlds (2 and 4 CPU processes, one thread each) run every case: global fp32 q/k/v/dout are drawn
with one seed on all ranks, the reference is ``F.scaled_dot_product_attention`` on the whole sequence with
the equivalent dense boolean mask (kv heads expanded for GQA), the cp run takes ``cp.shard`` of the inputs
and the gathered output and q/k/v gradients are compared with the reference.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_workers

from openspeed.distributed.context_parallel.ulysses import head_plan, split_heads
from openspeed.errors import ConfigError

# Max |difference| relative to max |reference| (unit-scale data).
REL_TOL = 1e-5
HEAD_DIM = 8
PACKED_LENGTHS = (13, 29, 22)  # + a tail of 8 up to 72 (a multiple of 2 * cp for cp in {2, 4})
PACKED_SEQ = 72
PADDED_SEQ = 48
PADDED_LENGTHS = (48, 37)  # right padding in the second row


def test_head_split_is_uneven_and_gqa_aware():
    assert split_heads(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    plan = head_plan(6, 2, 4, 1)  # query heads 2, 3 read kv heads 0, 1 (groups of 3)
    assert plan.kv_ranges == [(0, 1), (0, 2), (1, 2), (1, 2)] and plan.kv_index is None
    plan = head_plan(10, 2, 4, 1)  # query heads 3, 4, 5 read kv heads 0, 0, 1: not a plain GQA group
    assert plan.kv_ranges[1] == (0, 2) and plan.kv_index.tolist() == [0, 0, 1]
    message = r"^context parallel Ulysses degree 4 exceeds the 2 attention heads$"
    with pytest.raises(ConfigError, match=message):
        head_plan(2, 2, 4, 0)


def test_zigzag_causal_blocks_are_balanced():
    """Ring causal on the zigzag layout: every rank computes the same number of (query, key) pairs; the
    own block is one causal triangle, every other block is exactly half of the rows or half of the keys."""
    from openspeed.distributed.context_parallel.blocks import plan_block

    world, seq = 4, 64
    layout = [torch.tensor(p) for p in _expected_layout("ring", world, seq)]
    local = seq // world
    work = []
    for rank in range(world):
        pairs = 0
        for source in range(world):
            plan = plan_block(layout[rank], layout[source], causal=True)
            rows = plan.rows.stop - plan.rows.start
            cols = plan.cols.stop - plan.cols.start
            if source == rank:
                assert plan.causal and plan.mask is None and (rows, cols) == (local, local)
                pairs += local * (local + 1) // 2
            else:
                assert not plan.causal and plan.mask is None  # no mask: every pair in the box is visible
                half = (local // 2, local) if source > rank else (local, local // 2)
                assert (rows, cols) == half, (rank, source, rows, cols)
                pairs += rows * cols
        work.append(pairs)
    assert len(set(work)) == 1 and sum(work) == seq * (seq + 1) // 2


# --------------------------------------------------------------------------------------------------
# Inside the spawned workers
# --------------------------------------------------------------------------------------------------


def _inputs(kind: str, num_q_heads: int, num_kv_heads: int, seed: int):
    """Global tensors of one case: q, k, v, dout, attention_mask (or None), cu_seqlens (or None)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "plain":  # no padding, no packing: the zigzag fast paths (no mask at all)
        batch, seq, mask, cu_seqlens = 1, PADDED_SEQ, None, None
    elif kind == "padded":
        batch, seq = 2, PADDED_SEQ
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for row, length in enumerate(PADDED_LENGTHS):
            mask[row, :length] = 1
        cu_seqlens = None
    else:
        batch, seq = 1, PACKED_SEQ
        bounds = [0]
        for length in PACKED_LENGTHS:
            bounds.append(bounds[-1] + length)
        cu_seqlens = torch.tensor([*bounds, seq], dtype=torch.int32)  # the tail is a segment of its own
        # "packed_masked": the tail is padding as well, so its queries see no key at all.
        mask = None
        if kind == "packed_masked":
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[:, bounds[-1] :] = 0
    q = torch.randn(batch, num_q_heads, seq, HEAD_DIM, generator=gen)
    k = torch.randn(batch, num_kv_heads, seq, HEAD_DIM, generator=gen)
    v = torch.randn(batch, num_kv_heads, seq, HEAD_DIM, generator=gen)
    dout = torch.randn(batch, num_q_heads, seq, HEAD_DIM, generator=gen)
    return q, k, v, dout, mask, cu_seqlens


def _allowed(batch: int, seq: int, causal: bool, mask, cu_seqlens) -> torch.Tensor:
    """(batch, seq, seq) bool: may query i attend to key j."""
    pos = torch.arange(seq)
    allowed = torch.ones(batch, seq, seq, dtype=torch.bool)
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    if cu_seqlens is not None:
        seg = torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)
        allowed &= seg[None, :] == seg[:, None]
    if mask is not None:
        allowed &= mask.bool()[:, None, :]
    return allowed


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _run_case(cp, kind: str, causal: bool, num_q_heads: int, num_kv_heads: int, seed: int, math=False):
    """Max relative error of out, dq, dk, dv against the one-process reference."""
    from openspeed.distributed.context_parallel import context_parallel_attention

    q, k, v, dout, mask, cu_seqlens = _inputs(kind, num_q_heads, num_kv_heads, seed)
    batch, _, seq, _ = q.shape
    allowed = _allowed(batch, seq, causal, mask, cu_seqlens)
    # A query that sees no key: the reference lets it see all (to stay finite); cp gives 0. Neither is
    # compared, and its output gets no gradient (as a masked-out loss would give it none).
    seen = allowed.any(-1)
    dout = dout * seen[:, None, :, None]
    groups = num_q_heads // num_kv_heads
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(
        ref_q,
        ref_k.repeat_interleave(groups, 1),
        ref_v.repeat_interleave(groups, 1),
        attn_mask=(allowed | ~seen[..., None])[:, None],
    )
    ref.backward(dout)

    local_q, local_k, local_v = (cp.shard(t, 2).requires_grad_() for t in (q, k, v))
    out = context_parallel_attention(
        local_q, local_k, local_v, cp=cp, causal=causal,
        attention_mask=None if mask is None else cp.shard(mask, 1), cu_seqlens=cu_seqlens, _math=math,
    )
    assert out.shape == local_q.shape
    out.backward(cp.shard(dout, 2))
    full_out = cp.gather(out.detach(), 2)
    assert bool(torch.isfinite(full_out).all())
    rows = seen[:, None, :, None].expand_as(ref)
    return {
        "out": _rel(full_out[rows], ref.detach()[rows]),
        "dq": _rel(cp.gather(local_q.grad, 2), ref_q.grad),
        "dk": _rel(cp.gather(local_k.grad, 2), ref_k.grad),
        "dv": _rel(cp.gather(local_v.grad, 2), ref_v.grad),
    }


def _expected_layout(algo: str, world: int, seq: int) -> list[list[int]]:
    """Each rank's global positions, written out independently of the implementation."""
    if algo == "ulysses":
        per = seq // world
        return [list(range(r * per, (r + 1) * per)) for r in range(world)]
    ulysses = 2 if algo == "hybrid" else 1
    ring = world // ulysses
    chunk = seq // (2 * ring)
    layout = []
    for g in range(ring):
        tokens = list(range(g * chunk, (g + 1) * chunk)) + list(
            range((2 * ring - 1 - g) * chunk, (2 * ring - g) * chunk)
        )
        per = len(tokens) // ulysses
        layout += [tokens[u * per : (u + 1) * per] for u in range(ulysses)]
    return layout


def _check_layout_and_gather(cp, algo: str, world: int) -> None:
    import torch.distributed as dist

    seq = 4 * cp.seq_multiple
    assert cp.local_indices(seq).tolist() == _expected_layout(algo, world, seq)[cp.rank], algo
    # shard -> gather is the identity; the gather's backward takes this rank's slice of the gradient.
    x = torch.randn(2, seq, 3, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(2, seq, 3, generator=torch.Generator().manual_seed(6))
    local = cp.shard(x, 1).requires_grad_()
    full = cp.gather(local, 1)
    assert torch.equal(full, x), algo
    (full * weight).sum().backward()
    assert torch.equal(local.grad, cp.shard(weight, 1)), algo
    # Every position is held by exactly one rank.
    held = [None] * world
    dist.all_gather_object(held, cp.local_indices(seq).tolist())
    assert sorted(sum(held, [])) == list(range(seq)), algo


def _one_line_error(fn, error_type) -> str:
    try:
        fn()
    except error_type as err:
        message = str(err)
        assert message and "\n" not in message, message
        return message
    raise AssertionError(f"{fn} did not raise {error_type.__name__}")


def _check_bad_setups(world: int) -> dict[str, str]:
    import torch.distributed as dist

    from openspeed.distributed.context_parallel import ContextParallel, context_parallel_attention

    group = dist.group.WORLD
    messages = {
        "algo": _one_line_error(lambda: ContextParallel.from_group(group, "zigzag"), ConfigError),
        "hybrid_no_degree": _one_line_error(lambda: ContextParallel.from_group(group, "hybrid"), ConfigError),
        "hybrid_degree": _one_line_error(lambda: ContextParallel.from_group(group, "hybrid", 3), ConfigError),
    }
    ring = ContextParallel.from_group(group, "ring")
    bad_seq = 2 * world + world  # a multiple of cp but not of 2 * cp
    messages["seq_multiple"] = _one_line_error(lambda: ring.local_indices(bad_seq), ValueError)
    q = torch.randn(1, 4, bad_seq // world, HEAD_DIM)
    messages["seq_multiple_attention"] = _one_line_error(
        lambda: context_parallel_attention(q, q, q, cp=ring, causal=True), ValueError
    )
    ulysses = ContextParallel.from_group(group, "ulysses")
    q = torch.randn(1, world // 2, 2, HEAD_DIM)
    messages["ulysses_heads"] = _one_line_error(
        lambda: context_parallel_attention(q, q, q, cp=ulysses, causal=True), ConfigError
    )
    return messages


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from openspeed.distributed.context_parallel import ContextParallel

    world = dist.get_world_size()
    group = dist.group.WORLD
    results: dict[str, dict[str, float]] = {}
    algos = ["ulysses", "ring"] + (["hybrid"] if world == 4 else [])
    seed = 0
    for algo in algos:
        cp = ContextParallel.from_group(group, algo, 2 if algo == "hybrid" else None)
        _check_layout_and_gather(cp, algo, world)
        for causal in (True, False):
            for kind in ("plain", "padded", "packed"):
                for heads in ((4, 4), (4, 2)):
                    # GQA packed cases pad the tail (queries that see nothing); MHA ones keep it a segment.
                    data = "packed_masked" if kind == "packed" and heads[1] == 2 else kind
                    seed += 1
                    key = f"cp{world}/{algo}/{'causal' if causal else 'full'}/{data}/{heads[0]}q{heads[1]}kv"
                    results[key] = _run_case(cp, data, causal, *heads, seed)
                    if algo == "ring" and world == 2:
                        # The exact fp32 block math (used off CPU) must agree too.
                        results[key + "/math"] = _run_case(cp, data, causal, *heads, seed, math=True)
    if world == 4:
        ulysses = ContextParallel.from_group(group, "ulysses")
        for causal in (True, False):
            name = "causal" if causal else "full"
            results[f"cp4/ulysses/{name}/padded/6q6kv"] = _run_case(ulysses, "padded", causal, 6, 6, 100)
            results[f"cp4/ulysses/{name}/packed_masked/6q2kv"] = _run_case(
                ulysses, "packed_masked", causal, 6, 2, 101
            )
        # Query heads 3, 4, 5 of rank 1 read kv heads 0, 0, 1: kv heads expanded per query head.
        results["cp4/ulysses/causal/padded/10q2kv"] = _run_case(ulysses, "padded", True, 10, 2, 102)
        # The hybrid from a DeviceMesh (sub-groups by unflattening the mesh).
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("cp",))
        hybrid = ContextParallel.from_mesh(mesh, "hybrid", 2)
        results["cp4/hybrid_mesh/causal/packed_masked/4q2kv"] = _run_case(
            hybrid, "packed_masked", True, 4, 2, 103
        )
    messages = _check_bad_setups(world)
    if rank == 0:
        with open(os.path.join(out_dir, f"results_{world}.json"), "w", encoding="utf-8") as fh:
            json.dump({"errors": results, "messages": messages}, fh)


def _spawn(world: int, out_dir: str) -> dict:
    run_workers(_worker, world, out_dir)
    with open(os.path.join(out_dir, f"results_{world}.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    for key, errors in sorted(results["errors"].items()):
        print(key, " ".join(f"{name}={value:.1e}" for name, value in errors.items()))
    return results


def _assert_close(results: dict) -> None:
    bad = {
        key: errors for key, errors in results["errors"].items() if max(errors.values()) >= REL_TOL
    }
    assert bad == {}


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_attention_matches_one_process(tmp_path, world):
    """Every algorithm x causal/full x padded/packed x MHA/GQA (and unaligned Ulysses heads on 4 ranks)."""
    results = _spawn(world, str(tmp_path))
    expected_cases = 24 + 12 if world == 2 else 36 + 6
    assert len(results["errors"]) == expected_cases
    _assert_close(results)
    messages = results["messages"]
    assert messages["algo"] == "context parallel algorithm must be one of ulysses, ring, hybrid, got 'zigzag'"
    assert messages["hybrid_no_degree"] == "context parallel algo 'hybrid' needs ulysses_degree"
    if world == 4:
        assert messages["hybrid_degree"] == "context parallel ulysses_degree=3 does not divide the cp size 4"
    expected = (
        f"context parallel ring over {world} ranks needs the sequence length to be a multiple of {2 * world}"
    )
    assert messages["seq_multiple"] == f"{expected}, got {3 * world}"
    assert messages["seq_multiple_attention"] == f"{expected}, got {3 * world}"
    assert messages["ulysses_heads"].startswith(f"context parallel Ulysses degree {world} exceeds")
