"""Attention kernels on the accelerator (``gpu`` tests: deselected where the accelerator is the CPU; run
by ``benchmarks/gpu_check.sh``).

* :func:`openspeed.ops.attention.attention` on the device (SDPA, and flash-attn's varlen kernel when it
  is installed) equals float64 attention computed sequence by sequence on the host, for padded, packed
  and packed+padded layouts, MHA and GQA, fp32 and bf16, with one plan shared by several calls.
* Ring attention's blocks go through the LSE-returning CUDA kernels (``_scaled_dot_product_flash_attention``
  for unmasked half-precision blocks, ``_scaled_dot_product_efficient_attention`` otherwise): output, LSE
  and gradients equal the exact fp32 path, and no kernel fell back to it.
* Context-parallel attention (ring, over the one-rank group of this process) equals the math path and the
  plain attention call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _attention_cases import sequences

pytestmark = pytest.mark.gpu

DIM = 64


@pytest.fixture(scope="module")
def device():
    from openspeed.accelerator import get_accelerator

    acc = get_accelerator()
    assert acc.device_type != "cpu"
    return acc.device


def _layout(kind: str):
    """``(batch, seq, attention_mask, cu_seqlens)``: CPU tensors, as the collator builds them."""
    if kind == "padded":
        mask = torch.tensor([[1] * 40, [1] * 24 + [0] * 16, [0] * 9 + [1] * 31])
        return 3, 40, mask, None
    if kind == "packed":
        return 1, 80, None, torch.tensor([0, 16, 32, 32, 48, 69, 80])
    mask = torch.tensor([[1] * 24 + [1] * 16 + [0] * 8 + [1] * 16 + [0] * 16])
    return 1, 80, mask, torch.tensor([0, 24, 48, 64, 80])


def _reference(q, k, v, causal, batch, seq, mask, cu_seqlens):
    """float64 on the host, sequence by sequence: ``[(row, token indices, output)]``."""
    groups = q.shape[1] // k.shape[1]
    out = []
    for row, idx in sequences(batch, seq, mask, cu_seqlens):
        qs, ks, vs = (t[row : row + 1, :, idx].cpu().double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        out.append((row, idx, F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)))
    return out


# flash-attn takes fp16 / bf16 only
BACKENDS = [(False, torch.float32), (False, torch.bfloat16), (True, torch.bfloat16)]


@pytest.mark.parametrize(("flash", "dtype"), BACKENDS, ids=["sdpa-fp32", "sdpa-bf16", "flash_varlen-bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", ["padded", "packed", "packed_padded"])
def test_attention_on_the_device_equals_float64(device, monkeypatch, kind, heads, flash, dtype):
    import openspeed.ops.attention as attn

    if flash:
        if attn._flash_varlen_func() is None:
            pytest.skip("flash-attn is not installed: its varlen path was not run")
    else:
        monkeypatch.setattr(attn, "_flash_varlen_func", lambda: None)
    batch, seq, mask, cu_seqlens = _layout(kind)
    plan = attn.attention_plan(attention_mask=None if mask is None else mask.to(device), cu_seqlens=cu_seqlens)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for call in range(2):  # the second call reuses what the first derived
        gen = torch.Generator().manual_seed(call)
        q, k, v = (torch.randn(batch, h, seq, DIM, generator=gen) for h in (heads[0], heads[1], heads[1]))
        out = attn.attention(*(t.to(device, dtype) for t in (q, k, v)), causal=True, plan=plan)
        assert out.device.type == device.type and out.dtype == dtype
        for row, idx, ref in _reference(q, k, v, True, batch, seq, mask, cu_seqlens):
            got = out[row : row + 1, :, idx.to(device)].double().cpu()
            assert float((got - ref).abs().max()) <= tol, (kind, call, row)


def _plans(device):
    """Named ring-block plans covering each kernel layout: no mask, causal square, masked (an offset causal
    box), packed segments, key padding with rows that see no key."""
    from openspeed.distributed.context_parallel.blocks import plan_block

    pos = torch.arange(64, device=device)
    seg = torch.tensor([0] * 20 + [1] * 30 + [2] * 14, device=device)
    valid = torch.ones(2, 64, dtype=torch.bool, device=device)
    valid[1, :10] = False  # row 1's first 10 queries see no key
    return {
        "full": plan_block(pos, pos, causal=False),
        "causal": plan_block(pos, pos, causal=True),
        "offset": plan_block(pos + 32, pos, causal=True),
        "packed": plan_block(pos, pos, causal=True, q_seg=seg, k_seg=seg),
        "padded": plan_block(pos, pos, causal=True, key_valid=valid),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_ring_blocks_use_the_fused_kernels_and_equal_the_math_path(device, heads, dtype):
    from openspeed.distributed.context_parallel import blocks

    blocks._failed.clear()
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    scale = DIM**-0.5
    for name, plan in _plans(device).items():
        gen = torch.Generator().manual_seed(len(name))
        q, k, v = (torch.randn(2, h, 64, DIM, generator=gen).to(device, dtype) for h in (heads[0], heads[1], heads[1]))
        kernel = blocks.fused_kernel(q, k, plan)
        want = "flash" if dtype != torch.float32 and plan.mask is None else "efficient"
        assert kernel == want, (name, kernel)
        out, lse = blocks.block_forward(q, k, v, plan, scale)
        out_m, lse_m = blocks.block_forward(q, k, v, plan, scale, math=True)
        assert not blocks._failed, f"{name}: the {kernel} kernel failed and fell back to the math path"
        seen = torch.isfinite(lse_m)
        assert torch.equal(torch.isfinite(lse), seen), name
        assert float((lse - lse_m)[seen].abs().max()) <= tol, name
        assert float((out.float() - out_m.float())[seen].abs().max()) <= tol, name

        # The backward, given the final output / LSE of the whole query block (this block alone).
        full_out = torch.zeros_like(q)
        full_out[:, :, plan.rows] = out_m
        full_lse = torch.zeros(q.shape[:3], device=device)
        full_lse[:, :, plan.rows] = lse_m.masked_fill(~seen, 0.0)
        dout = torch.randn(q.shape, generator=gen).to(device, dtype)
        dout[:, :, plan.rows] = dout[:, :, plan.rows].masked_fill(~seen[..., None], 0.0)
        fused = blocks.block_backward(dout, q, k, v, full_out, full_lse, plan, scale)
        math = blocks.block_backward(dout, q, k, v, full_out, full_lse, plan, scale, math=True)
        assert not blocks._failed, f"{name}: the {kernel} backward failed and fell back to the math path"
        for label, a, b in zip("qkv", fused, math, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, (name, label)
            err = float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-6)
            assert err <= tol, (name, label, err)


def test_context_parallel_ring_on_the_device(device):
    import torch.distributed as dist

    from openspeed.accelerator import init_distributed
    from openspeed.distributed.context_parallel import ContextParallel, blocks, context_parallel_attention
    from openspeed.ops.attention import attention, attention_plan

    if not dist.is_initialized():
        init_distributed()
    cp = ContextParallel.from_group(dist.group.WORLD, "ring")
    blocks._failed.clear()
    batch, seq, mask, _ = _layout("padded")
    mask = mask.to(device)
    plan = attention_plan(attention_mask=mask)
    for call in range(2):
        gen = torch.Generator().manual_seed(call)
        q, k, v = (torch.randn(batch, h, seq, DIM, generator=gen).to(device, torch.bfloat16).requires_grad_()
                   for h in (8, 2, 2))
        out = context_parallel_attention(q, k, v, cp=cp, causal=True, attention_mask=mask, plan=plan)
        out_m = context_parallel_attention(q, k, v, cp=cp, causal=True, attention_mask=mask, _math=True)
        plain = attention(q, k, v, causal=True, attention_mask=mask)
        real = mask.bool()[:, None, :, None].expand_as(out)
        assert float((out - out_m).detach().float()[real].abs().max()) <= 3e-2
        assert float((out - plain).detach().float()[real].abs().max()) <= 3e-2
        grads = torch.autograd.grad((out.float() * real).sum(), (q, k, v))
        grads_m = torch.autograd.grad((out_m.float() * real).sum(), (q, k, v))
        for a, b in zip(grads, grads_m, strict=True):
            assert float((a.float() - b.float()).abs().max()) <= 3e-2 * max(float(b.float().abs().max()), 1.0)
    assert not blocks._failed
