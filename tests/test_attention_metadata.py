"""Attention metadata is derived once per forward, not once per layer call.

* One :class:`~openspeed.ops.attention.AttentionPlan` reused over several calls gives exactly the
  outputs and gradients of the per-call path (``attention_mask`` / ``cu_seqlens`` given to every
  call), for padded, packed and packed+padded layouts, causal or not, MHA or GQA; both agree with
  attention computed sequence by sequence in float64. The same through the flash-attn varlen path
  (a stand-in kernel on the CPU): the device-side ``cu_seqlens`` it receives is one tensor, built once.
* The host reads of ``ops/attention.py`` (``tolist``, ``cpu()``, ``.to("cpu")``, ``item``, ``bool``,
  ``int``) do not grow with the number of calls that share a plan.
* A Qwen2.5-VL forward builds three plans (the text stack, the vision windows, the vision frames)
  whatever its depth, its host reads do not depend on the depth, its logits equal the per-call path,
  and a decode step reads nothing back on the host.
* Under context parallelism (a one-process group) the plan keeps what the cp attention derives (the
  key mask's all-gather runs once for all the calls).
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from _attention_cases import sequences
from _qwen_tiny import IMAGE_BATCH, TEXT_BATCH, make_batch, native_config

import openspeed.models.layers.decoder as decoder_module
import openspeed.models.layers.kv_cache as kv_cache_module
import openspeed.models.qwen2_5_vl.model as qwen_model
import openspeed.ops.attention as attn_module
from openspeed.ops.attention import attention, attention_plan

TOL = 1e-5
DIM = 8
WATCHED = (attn_module.__file__,)


def _layout(kind: str) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
    """``(batch, seq, attention_mask, cu_seqlens)`` of a layout."""
    if kind == "padded":  # full row, right padding, left padding
        mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [0] * 3 + [1] * 7])
        return 3, 10, mask, None
    if kind == "packed":  # runs of equal lengths and an empty segment
        return 1, 20, None, torch.tensor([0, 4, 8, 8, 12, 17, 20])
    # padding inside segment 1 and a trailing all-padding segment
    mask = torch.tensor([[1] * 6 + [1] * 4 + [0] * 2 + [1] * 4 + [0] * 4])
    return 1, 20, mask, torch.tensor([0, 6, 12, 16, 20])


def _qkv(batch: int, seq: int, heads: tuple[int, int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, seq, DIM, generator=gen) for h in (heads[0], heads[1], heads[1])]


def _assert_matches_reference(out, q, k, v, causal, batch, seq, mask, cu_seqlens) -> None:
    """Every real query's output equals float64 attention over its own sequence's real tokens."""
    groups = q.shape[1] // k.shape[1]
    for row, idx in sequences(batch, seq, mask, cu_seqlens):
        qs, ks, vs = (t[row : row + 1, :, idx].double() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(
            qs, ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1), is_causal=causal
        )
        assert float((out[row : row + 1, :, idx].double() - ref).abs().max()) <= TOL


def _run(kind: str, causal: bool, heads, planned: bool, calls: int = 3):
    """Outputs and q/k/v gradients of ``calls`` attention calls ("layers") over one layout."""
    batch, seq, mask, cu_seqlens = _layout(kind)
    plan = attention_plan(attention_mask=mask, cu_seqlens=cu_seqlens)
    results = []
    for call in range(calls):
        q, k, v = (t.requires_grad_() for t in _qkv(batch, seq, heads, seed=call))
        if planned:
            out = attention(q, k, v, causal=causal, plan=plan)
        else:
            out = attention(q, k, v, causal=causal, attention_mask=mask, cu_seqlens=cu_seqlens)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + call))
        (out * weight).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad, (q.detach(), k.detach(), v.detach())))
    return results, (batch, seq, mask, cu_seqlens)


LAYOUTS = ["padded", "packed", "packed_padded"]
HEADS = [(4, 4), (4, 2)]


@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_planned_path_equals_per_call_path(kind, causal, heads):
    planned, layout = _run(kind, causal, heads, planned=True)
    per_call, _ = _run(kind, causal, heads, planned=False)
    for got, want in zip(planned, per_call, strict=True):
        for a, b in zip(got[:4], want[:4], strict=True):
            assert torch.equal(a, b)
        _assert_matches_reference(got[0], *got[4], causal, *layout)


class _FakeFlashVarlen:
    """Stands in for ``flash_attn.flash_attn_varlen_func`` on the CPU: same layout and arguments."""

    def __init__(self):
        self.cu_tensors = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, deterministic):
        assert q.dim() == 3 and q.shape[1] % k.shape[1] == 0 and cu_q is cu_k and dropout_p == 0.0
        assert cu_q.dtype == torch.int32 and cu_q.device == q.device
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        assert max_q == max_k == max(lengths) and min(lengths) > 0 and int(cu_q[-1]) == q.shape[0]
        self.cu_tensors.append(cu_q)
        groups = q.shape[1] // k.shape[1]
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # (L, H, D) -> (1, H, L, D)
            out = F.scaled_dot_product_attention(
                qs, ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1), is_causal=causal,
                scale=softmax_scale,
            )
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)


@pytest.fixture
def fake_flash(monkeypatch):
    fake = _FakeFlashVarlen()
    monkeypatch.setattr(attn_module, "_flash_varlen_func", lambda: fake)
    monkeypatch.setattr(attn_module, "_flash_dtype", lambda q: q.dtype)
    return fake


@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_flash_varlen_layout_is_built_once(fake_flash, kind, heads):
    causal = True
    planned, layout = _run(kind, causal, heads, planned=True)
    planned_cu = fake_flash.cu_tensors[:]
    fake_flash.cu_tensors.clear()
    per_call, _ = _run(kind, causal, heads, planned=False)
    assert all(cu is planned_cu[0] for cu in planned_cu)  # one device tensor for every call
    assert len({id(cu) for cu in fake_flash.cu_tensors}) == len(fake_flash.cu_tensors)  # one per call
    batch, seq, mask, cu_seqlens = layout
    for got, want in zip(planned, per_call, strict=True):
        for a, b in zip(got[:4], want[:4], strict=True):
            assert torch.equal(a, b)
        _assert_matches_reference(got[0], *got[4], causal, *layout)
        if mask is not None:
            assert (got[0].transpose(1, 2)[mask == 0] == 0).all()  # padding queries: zeros on this path


# --------------------------------------------------------------------------------------------------
# Host reads
# --------------------------------------------------------------------------------------------------

_READS = ("tolist", "cpu", "item", "__bool__", "__int__", "__float__")


def _is_host(device) -> bool:
    return device == "cpu"  # the spelling this code uses for a copy to the host


def _count_host_reads(fn, monkeypatch, files=WATCHED) -> int:
    """Host reads made by code in ``files`` while ``fn()`` runs (on the CPU every tensor is on the host,
    so they are counted by the calls that would copy a device tensor there)."""
    count = 0
    originals = {name: getattr(torch.Tensor, name) for name in (*_READS, "to")}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            nonlocal count
            if sys._getframe(1).f_code.co_filename in files:
                if name != "to" or any(_is_host(a) for a in (*args, kwargs.get("device"))):
                    count += 1
            return original(self, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in originals:
            patch.setattr(torch.Tensor, name, counting(name))
        fn()
    return count


@pytest.mark.parametrize("flash", [False, True], ids=["sdpa", "flash_varlen"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_host_reads_do_not_grow_with_the_calls_sharing_a_plan(monkeypatch, request, kind, flash):
    if flash:
        request.getfixturevalue("fake_flash")

    def reads(calls: int, planned: bool) -> int:
        return _count_host_reads(lambda: _run(kind, True, (4, 2), planned, calls), monkeypatch)

    one, four = reads(1, True), reads(4, True)
    assert one == four
    if kind != "padded" or flash:  # the SDPA path reads nothing of a padded batch
        assert one > 0 and reads(4, False) == 4 * reads(1, False)


def test_plan_misuse_is_an_error():
    batch, seq, mask, cu_seqlens = _layout("packed_padded")
    q, k, v = _qkv(batch, seq, (2, 2), 0)
    plan = attention_plan(attention_mask=mask, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="either plan or"):
        attention(q, k, v, causal=True, attention_mask=mask, plan=plan)
    attention(q, k, v, causal=True, plan=plan)
    with pytest.raises(ValueError, match="this attention plan is for"):
        attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], causal=True, plan=plan)


# --------------------------------------------------------------------------------------------------
# The model builds its plans once per forward
# --------------------------------------------------------------------------------------------------


def _model(text_layers: int, vision_depth: int):
    from openspeed.models.registry import get_model_spec

    cfg = native_config()
    cfg = dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, num_hidden_layers=text_layers),
        vision=dataclasses.replace(cfg.vision, depth=vision_depth),
    )
    spec = get_model_spec("qwen2_5_vl")
    torch.manual_seed(0)
    model = spec.build(cfg)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.1)
    spec.reset_buffers(model)
    return model.eval()


def _packed_text_batch() -> dict:
    """Two text samples packed into one row, then a padding segment (what the packing collator builds)."""
    rows = make_batch(TEXT_BATCH, seed=3)
    lengths = rows["attention_mask"].sum(1).tolist()
    ids = torch.cat([rows["input_ids"][b, :n] for b, n in enumerate(lengths)] + [torch.zeros(4, dtype=torch.long)])
    mask = torch.cat([torch.ones(sum(lengths), dtype=torch.long), torch.zeros(4, dtype=torch.long)])
    cu = torch.tensor([0, lengths[0], sum(lengths), sum(lengths) + 4], dtype=torch.int32)
    return {"input_ids": ids[None], "attention_mask": mask[None], "cu_seqlens": cu}


BATCHES = {"images_padded": lambda: make_batch(IMAGE_BATCH, seed=2), "text_packed": _packed_text_batch}


@pytest.mark.parametrize("flash", [False, True], ids=["sdpa", "flash_varlen"])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_model_forward_builds_its_plans_once(monkeypatch, request, batch_name, flash):
    if flash:
        request.getfixturevalue("fake_flash")
    batch = BATCHES[batch_name]()
    built = []

    def counting_plan(**kwargs):
        built.append(kwargs)
        return attention_plan(**kwargs)

    # The vision tower's plans are built in the Qwen model, the text stack's in the shared decoder.
    for module in (qwen_model, decoder_module):
        monkeypatch.setattr(module, "attention_plan", counting_plan)
    reads, logits = {}, {}
    for depth in (2, 4):
        model = _model(text_layers=depth, vision_depth=2 * depth)
        built.clear()
        with torch.no_grad():
            reads[depth] = _count_host_reads(lambda m=model, d=depth: logits.setdefault(d, m(**batch).logits),
                                             monkeypatch)
        # The text stack's plan and the vision tower's two (windows, frames); each holds what it was
        # built from: the padded rows' mask, or a packed row's cu_seqlens (its padding is a segment of
        # its own, so no mask).
        assert len(built) == 3, built
        text = built[-1]
        if batch_name == "text_packed":
            assert text["attention_mask"] is None and torch.equal(text["cu_seqlens"], batch["cu_seqlens"])
        else:
            assert text["cu_seqlens"] is None and torch.equal(text["attention_mask"], batch["attention_mask"])
        # Against the per-call path: every layer's attention given the mask / cu_seqlens itself.
        with monkeypatch.context() as patch:
            def per_call(q, k, v, *, causal, scale, plan):
                return attn_module.attention(q, k, v, causal=causal, scale=scale,
                                             attention_mask=plan.attention_mask, cu_seqlens=plan.cu_seqlens)

            for module in (qwen_model, decoder_module):
                patch.setattr(module, "attention", per_call)
            # Same kernels on the same shapes, but two separate forwards: oneDNN may pick another code
            # path for differently aligned buffers, so equal to rounding, not bit for bit (a wrong mask
            # or segment moves these logits by ~1e-1).
            with torch.no_grad():
                torch.testing.assert_close(model(**batch).logits, logits[depth], rtol=1e-5, atol=1e-6)
    assert reads[2] == reads[4]


def test_decode_step_reads_nothing_on_the_host(monkeypatch):
    model = _model(text_layers=2, vision_depth=4)
    batch = make_batch(TEXT_BATCH, seed=4)
    batch.pop("labels")
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(**batch, kv_cache=cache)
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = torch.tensor([[11], [12]])
        files = (*WATCHED, qwen_model.__file__, decoder_module.__file__, kv_cache_module.__file__)
        assert _count_host_reads(lambda: model(input_ids=step, attention_mask=mask, kv_cache=cache),
                                 monkeypatch, files) == 0


# --------------------------------------------------------------------------------------------------
# Context parallel keeps its derived layout in the plan
# --------------------------------------------------------------------------------------------------


def test_context_parallel_layout_is_derived_once(monkeypatch):
    import torch.distributed as dist

    from openspeed.distributed.context_parallel import ContextParallel
    from openspeed.ops.attention import context_parallel_scope

    fresh = not dist.is_initialized()  # another test of this process may have left its one-rank group
    if fresh:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        cp = ContextParallel.from_group(dist.group.WORLD, "ring")
        gathers = []
        original = ContextParallel.gather_key_mask

        def counting(self, mask):
            gathers.append(mask)
            return original(self, mask)

        monkeypatch.setattr(ContextParallel, "gather_key_mask", counting)
        batch, seq, mask, _ = _layout("padded")
        plan = attention_plan(attention_mask=mask)
        for call in range(3):
            q, k, v = (t.requires_grad_() for t in _qkv(batch, seq, (4, 2), seed=call))
            with context_parallel_scope(cp):
                out = attention(q, k, v, causal=True, plan=plan)
            out.sum().backward()
            _assert_matches_reference(out.detach(), q.detach(), k.detach(), v.detach(), True, batch, seq, mask, None)
        assert len(gathers) == 1
        # Without a plan every call works it out again.
        with context_parallel_scope(cp):
            for _ in range(2):
                attention(q.detach(), k.detach(), v.detach(), causal=True, attention_mask=mask)
        assert len(gathers) == 3
    finally:
        if fresh:
            dist.destroy_process_group()
