"""Ring attention: key/value blocks travel around a ring of ranks; each rank keeps its queries.

Forward, on a ring of ``R`` ranks: at step ``i`` rank ``g`` holds the keys/values of rank ``g - i``. It
posts the exchange for the next step (send its current K/V block to ``g + 1``, receive ``g - 1``'s), computes
its queries against the current block (output + log-sum-exp, see ``blocks.py``), merges the block into
fp32 accumulators with the online softmax, then waits for the exchange. ``R - 1`` exchanges in all.

Backward (flash-attention style, nothing but q, k, v, the output and the LSE is saved): K/V go around
the ring again; every block's gradients are recomputed from the final output and LSE. The query
gradient stays local. The key/value gradient of owner ``o`` is collected by an fp32 accumulator that
starts at rank ``o + 1`` (step 1), picks up each rank's contribution while it travels on, and arrives
back at ``o`` after ``R - 1`` hops, where ``o`` adds its own step-0 part.

Causal work is balanced by the zigzag layout and the block plans: against an earlier rank's block only
its first chunk is visible (half the keys), against a later rank's block only the second query chunk
sees anything (half the queries), and the own block is one causal triangle; invisible parts are never
computed.
"""

from __future__ import annotations

import torch

from openspeed.distributed.context_parallel.blocks import (
    BlockPlan,
    block_backward,
    block_forward,
    merge_block,
)
from openspeed.distributed.context_parallel.comm import RingExchange

_KV_TAG, _DKV_TAG = 0, 1


def _covers(span: slice, length: int) -> bool:
    return span.start == 0 and span.stop == length


class RingAttention(torch.autograd.Function):
    """``out = attention(q, all ranks' k, v)`` over a ring; ``plans[i]`` is the block plan of step ``i``.

    ``ring`` is ``None`` (or size 1) for a plain local attention over ``plans[0]``. ``q`` may have more heads
    than ``k``/``v`` (a multiple of them: plain GQA groups).
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ring: RingExchange | None,
        plans: list[BlockPlan | None],
        scale: float,
        math: bool = False,
    ) -> torch.Tensor:
        steps = len(plans)
        out_acc, lse_acc = None, None
        kv = torch.stack([k, v]) if steps > 1 else None
        cur_k, cur_v = k, v
        for i in range(steps):
            pending = ring.start(kv, _KV_TAG) if i < steps - 1 else None
            plan = plans[i]
            if plan is not None:
                block_out, block_lse = block_forward(q, cur_k, cur_v, plan, scale, math)
                if out_acc is None and _covers(plan.rows, q.shape[2]):
                    # The first block over every row starts the accumulator (no merge). A copy, as later
                    # blocks merge into it in place: the kernel's own output may be held elsewhere (a
                    # selective-recompute cache keeps attention outputs and refuses mutated ones).
                    out_acc = block_out.to(torch.float32, copy=True)
                    lse_acc = block_lse.to(torch.float32, copy=True)
                else:
                    if out_acc is None:
                        out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
                    merge_block(out_acc, lse_acc, block_out, block_lse, plan.rows)
            if pending is not None:
                kv = ring.wait(pending)
                cur_k, cur_v = kv[0], kv[1]
        if out_acc is None:  # no query sees any key
            out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.ring, ctx.plans, ctx.scale, ctx.math = ring, plans, scale, math
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring, plans, scale, math = ctx.ring, ctx.plans, ctx.scale, ctx.math
        steps = len(plans)
        # Queries that saw no key at all got output 0 and take no gradient; give them a finite LSE so the
        # recomputed probabilities stay finite (their zero dout makes them contribute nothing).
        unseen = torch.isinf(lse)
        dout = dout.masked_fill(unseen[..., None], 0.0).contiguous()
        lse = lse.masked_fill(unseen, 0.0)
        if steps == 1 and plans[0] is not None and _covers(plans[0].rows, q.shape[2]) and _covers(
            plans[0].cols, k.shape[2]
        ):
            # One block over everything (Ulysses): its gradients are the gradients.
            return (*block_backward(dout, q, k, v, out, lse, plans[0], scale, math), None, None, None, None)

        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        own_dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
        kv = torch.stack([k, v]) if steps > 1 else None
        cur_k, cur_v = k, v
        travelling, dkv_pending = None, None
        for i in range(steps):
            kv_pending = ring.start(kv, _KV_TAG) if i < steps - 1 else None
            if i >= 2:
                travelling = ring.wait(dkv_pending)
            plan = plans[i]
            target = own_dkv
            if i >= 1:
                if travelling is None:
                    travelling = torch.zeros_like(own_dkv)
                target = travelling
            if plan is not None:
                block_dq, block_dk, block_dv = block_backward(
                    dout, q, cur_k, cur_v, out, lse, plan, scale, math
                )
                dq[:, :, plan.rows] += block_dq
                target[0][:, :, plan.cols] += block_dk
                target[1][:, :, plan.cols] += block_dv
            if i >= 1:
                # On to the next rank: after the last step that rank is the owner.
                dkv_pending = ring.start(travelling, _DKV_TAG)
            if kv_pending is not None:
                kv = ring.wait(kv_pending)
                cur_k, cur_v = kv[0], kv[1]
        if steps > 1:
            own_dkv += ring.wait(dkv_pending)
        return (
            dq.to(q.dtype),
            own_dkv[0].to(k.dtype),
            own_dkv[1].to(v.dtype),
            None,
            None,
            None,
            None,
        )
