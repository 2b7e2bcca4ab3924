"""Sequence packing ("EOD reset"): a packed micro-batch must compute what the padded batch computes.

Attention entry point: packed segments equal per-sample attention (outputs and input gradients), on the
SDPA path and through the flash-attn varlen dispatch (with a stand-in kernel, since flash-attn needs
CUDA). Collator: the packed layout. Model: a tiny Qwen2.5-VL gives the same loss, logits and every
parameter gradient packed as padded. Trainer: ``data.packing=true`` gives the reference run's losses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _qwen_tiny import (
    IMAGE_ID,
    PAD_ID,
    VIDEO_ID,
    make_batch,
    native_config,
)
from _train_utils import assert_curves_close, make_tiny_run_config, read_metrics, run_train, train_curve

import openspeed.ops.attention as attn_module
from openspeed.data.collator import IGNORE_INDEX, VLCollator, count_label_tokens
from openspeed.errors import BadSampleError
from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLModel
from openspeed.ops.attention import attention

# --------------------------------------------------------------------------------------------------
# Attention entry point
# --------------------------------------------------------------------------------------------------

ATTN_TOL = 1e-6  # relative to the largest |value| of the reference tensor (fp32)


def _reference_segment(q, k, v, causal):
    """Softmax attention of one (1, H, L, D) segment written out, kv heads expanded (GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _qkv(seq, q_heads, kv_heads, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, h, seq, dim, generator=gen, dtype=torch.float32).requires_grad_()
        for h in (q_heads, kv_heads, kv_heads)
    ]


def _grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs)


def _max_diff(a, b):
    """Largest |a - b| over pairs of tensors, relative to the largest |b| of each pair."""
    return max(
        float((x - y).detach().abs().max()) / max(float(y.detach().abs().max()), 1e-30)
        for x, y in zip(a, b, strict=True)
    )


SEGMENTS = {
    "uneven": [5, 11, 3],
    # adjacent equal lengths are batched into one SDPA call; an empty segment covers nothing
    "runs": [4, 4, 4, 7, 0, 4, 4],
}


@pytest.mark.parametrize("layout", list(SEGMENTS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_packed_attention_equals_per_sample_attention(layout, causal, heads):
    lengths = SEGMENTS[layout]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    q, k, v = _qkv(bounds[-1], *heads)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    out = attention(q, k, v, causal=causal, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    ref = torch.cat(
        [_reference_segment(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal)
         for a, b in zip(bounds[:-1], bounds[1:]) if b > a],
        dim=2,
    )
    assert out.shape == q.shape
    assert _max_diff([out], [ref]) <= ATTN_TOL
    grads, ref_grads = _grads(out, (q, k, v), weight), _grads(ref, (q, k, v), weight)
    assert _max_diff(grads, ref_grads) <= ATTN_TOL
    # Attention really stays inside segments: the packed result differs from unsegmented attention.
    whole = attention(q, k, v, causal=causal)
    assert _max_diff([whole], [ref]) > 1e-3


def _padded_packed_case(causal, heads):
    """A row of 3 samples, the middle one with 3 padding tokens inside its segment, 2 trailing pads.

    Returns (q, k, v), the packed call's keyword arguments, and the reference output on real tokens.
    """
    real = [6, 9, 4]
    pad = [0, 3, 2]
    bounds, mask = [0], []
    for n, p in zip(real, pad, strict=True):
        bounds.append(bounds[-1] + n + p)
        mask += [1] * n + [0] * p
    q, k, v = _qkv(bounds[-1], *heads, seed=2)
    refs = []
    for a, n in zip(bounds[:-1], real, strict=True):
        refs.append(_reference_segment(q[:, :, a : a + n], k[:, :, a : a + n], v[:, :, a : a + n], causal))
    kwargs = {"cu_seqlens": torch.tensor(bounds), "attention_mask": torch.tensor([mask])}
    return (q, k, v), kwargs, refs, bounds, real


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_packed_attention_with_padding_inside_segments(causal, heads):
    (q, k, v), kwargs, refs, bounds, real = _padded_packed_case(causal, heads)
    out = attention(q, k, v, causal=causal, **kwargs)
    assert torch.isfinite(out).all()
    for ref, a, n in zip(refs, bounds[:-1], real, strict=True):
        assert _max_diff([out[:, :, a : a + n]], [ref]) <= ATTN_TOL


class _FakeFlashVarlen:
    """Stands in for ``flash_attn.flash_attn_varlen_func`` on the CPU: same layout and arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, deterministic):
        assert q.dim() == 3 and q.shape[1] % k.shape[1] == 0
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and dropout_p == 0.0
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        assert max_q == max_k == max(lengths) and min(lengths) > 0 and int(cu_q[-1]) == q.shape[0]
        self.calls.append(lengths)
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            # (L, H, D) -> (1, H, L, D) and back.
            seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            outs.append(_reference_segment(*seg, causal)[0].transpose(0, 1))
        return torch.cat(outs)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_flash_varlen_dispatch_layouts(monkeypatch, heads):
    """The varlen path's unpadding, cu_seqlens and scatter-back, run with a stand-in kernel."""
    fake = _FakeFlashVarlen()
    monkeypatch.setattr(attn_module, "_flash_varlen_func", lambda: fake)
    monkeypatch.setattr(attn_module, "_flash_dtype", lambda q: q.dtype)
    causal = True

    # Packed, padding inside a segment and a trailing padding segment.
    (q, k, v), kwargs, refs, bounds, real = _padded_packed_case(causal, heads)
    out = attention(q, k, v, causal=causal, **kwargs)
    assert fake.calls[-1] == real
    for ref, a, n in zip(refs, bounds[:-1], real, strict=True):
        assert _max_diff([out[:, :, a : a + n]], [ref]) <= ATTN_TOL
    # Gradients through the gather/scatter equal the SDPA path's (padding queries' outputs are
    # unspecified, so they get no weight).
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) * kwargs["attention_mask"][0, :, None]
    monkeypatch.setattr(attn_module, "_flash_dtype", lambda q: None)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    sdpa = attention(q2, k2, v2, causal=causal, **kwargs)
    assert _max_diff(_grads(out, (q, k, v), weight), _grads(sdpa, (q2, k2, v2), weight)) <= ATTN_TOL
    monkeypatch.setattr(attn_module, "_flash_dtype", lambda q: q.dtype)

    # Packed without padding: segments straight through.
    out = attention(q, k, v, causal=causal, cu_seqlens=torch.tensor([0, 7, 12, bounds[-1]]))
    assert fake.calls[-1] == [7, 5, bounds[-1] - 12]

    # Padded batch of two rows (right padding): one sequence per row, padding removed.
    gen = torch.Generator().manual_seed(4)
    qb, kb, vb = (torch.randn(2, h, 10, 8, generator=gen) for h in (heads[0], heads[1], heads[1]))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    out = attention(qb, kb, vb, causal=causal, attention_mask=mask)
    assert fake.calls[-1] == [10, 6]
    assert (out[1, :, 6:] == 0).all()  # padding queries: zeros on this path
    for b, n in enumerate((10, 6)):
        ref = _reference_segment(qb[b : b + 1, :, :n], kb[b : b + 1, :, :n], vb[b : b + 1, :, :n], causal)
        assert _max_diff([out[b : b + 1, :, :n]], [ref]) <= ATTN_TOL


def test_bad_cu_seqlens_are_rejected():
    q, k, v = _qkv(6, 2, 2)
    with pytest.raises(ValueError, match="run from 0 to seq"):
        attention(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        attention(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 5, 3, 6]))
    with pytest.raises(ValueError, match="batch of one"):
        attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), causal=True,
                  cu_seqlens=torch.tensor([0, 6]))


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def _samples(pieces_list: list[list], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One ``ConversationDataset``-like sample per piece list (see ``_qwen_tiny.make_batch``)."""
    samples = []
    for i, pieces in enumerate(pieces_list):
        batch = make_batch([pieces], seed=seed + i)
        sample = {"input_ids": batch.pop("input_ids")[0], "labels": batch.pop("labels")[0]}
        for key in ("attention_mask", "mm_token_type_ids"):  # the collator makes these
            del batch[key]
        samples.append({**sample, **batch})
    return samples


def _collator(**kwargs) -> VLCollator:
    return VLCollator(PAD_ID, IMAGE_ID, VIDEO_ID, **kwargs)


# Images of different sizes, a text-only sample, a video, and a sample whose first token is a target.
MODEL_SAMPLES = [
    [("text", 5), ("image", [1, 8, 12]), ("answer", 6)],
    [("text", 4), ("answer", 7)],
    [("text", 3), ("image", [1, 6, 10]), ("text", 2), ("image", [1, 4, 4]), ("answer", 5)],
    [("answer", 2), ("text", 2), ("video", [2, 4, 6], 0.75), ("answer", 4)],
]


def test_packed_collator_layout():
    samples = _samples(MODEL_SAMPLES)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    real = sum(lengths)
    batch = _collator(packing=True, pad_to_multiple_of=16)(samples)
    total = (real + 15) // 16 * 16
    assert total > real  # the case with a trailing padding segment
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist(), total]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == bounds
    for key in ("input_ids", "labels", "attention_mask", "mm_token_type_ids"):
        assert batch[key].shape == (1, total), key
    assert batch["input_ids"][0, :real].tolist() == torch.cat([s["input_ids"] for s in samples]).tolist()
    assert (batch["input_ids"][0, real:] == PAD_ID).all()
    assert batch["attention_mask"][0].tolist() == [1] * real + [0] * (total - real)
    ids = batch["input_ids"][0]
    assert batch["mm_token_type_ids"][0].tolist() == ((ids == IMAGE_ID).long() + 2 * (ids == VIDEO_ID).long()).tolist()
    labels = batch["labels"][0]
    for s, a, b in zip(samples, bounds[:-2], bounds[1:-1], strict=True):
        assert labels[a] == IGNORE_INDEX  # never predicted from the previous sample
        assert labels[a + 1 : b].tolist() == s["labels"][1:].tolist()
    assert (labels[real:] == IGNORE_INDEX).all()
    # Sample 3 starts with an answer token: its label is the one the packing masks.
    assert samples[3]["labels"][0] != IGNORE_INDEX
    # Vision tensors in sample order: images of samples 0 and 2, the video of sample 3.
    assert batch["image_grid_thw"].tolist() == [[1, 8, 12], [1, 6, 10], [1, 4, 4]]
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
    assert torch.equal(batch["pixel_values_videos"], samples[3]["pixel_values_videos"])
    assert batch["video_grid_thw"].tolist() == [[2, 4, 6]]
    # The same loss tokens as the padded batch.
    padded = _collator()(samples)
    assert "cu_seqlens" not in padded
    assert count_label_tokens(batch) == count_label_tokens(padded) > 0
    # Without pad_to_multiple_of there is no padding segment.
    exact = _collator(packing=True)(samples)
    assert exact["cu_seqlens"].tolist() == bounds[:-1] and exact["input_ids"].shape == (1, real)


def test_packed_collator_max_len():
    samples = _samples(MODEL_SAMPLES[:2])
    longest = max(int(s["input_ids"].numel()) for s in samples)
    # Each sample fits: the row may be longer than max_len (it holds the whole micro-batch).
    batch = _collator(packing=True, max_len=longest)(samples)
    assert batch["input_ids"].shape[1] > longest
    with pytest.raises(BadSampleError) as info:
        _collator(packing=True, max_len=longest - 1)(samples)
    assert info.value.reason == "too_long"


def test_count_label_tokens_masks_segment_starts():
    """Boundary targets are not counted even if a packed batch's labels were not masked."""
    labels = torch.tensor([[-100, 5, 6, 7, 8, 9, 4, 3]])
    batch = {"labels": labels, "cu_seqlens": torch.tensor([0, 3, 6, 8])}
    # Targets labels[1:] = 5 6 7 8 9 4 3, less the segment starts 3 and 6 (7 and 4): 5 6 8 9 3.
    assert count_label_tokens(batch) == 5
    assert count_label_tokens({"labels": labels}) == 7


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

MODEL_REL_TOL = 1e-5


def _tiny_config() -> Qwen2_5_VLConfig:
    return native_config()


def _tiny_model() -> Qwen2_5_VLModel:
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(_tiny_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or "ln_q" in name):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model


@pytest.mark.parametrize("case", ["multimodal", "text_only"])
def test_packed_positions_restart_per_sample(case):
    """M-RoPE positions of a packed sample are exactly its positions in the padded batch.

    (RoPE attention cannot tell a constant offset within a segment, so the loss tests alone would
    not see positions that run on across samples.)
    """
    from openspeed.models.qwen2_5_vl.model import mrope_position_ids

    pieces = MODEL_SAMPLES if case == "multimodal" else [[("text", 4), ("answer", 8)], [("answer", 5)]]
    samples = _samples(pieces, seed=10)
    padded = _collator()(samples)
    packed = _collator(packing=True, pad_to_multiple_of=16)(samples)
    keys = ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
            "mm_token_type_ids")
    config = _tiny_config()
    ref = mrope_position_ids(config, *(padded.get(k) for k in keys))
    got = mrope_position_ids(config, *(packed.get(k) for k in keys), cu_seqlens=packed["cu_seqlens"])
    assert got.shape == (3, 1, packed["input_ids"].shape[1])
    bounds = packed["cu_seqlens"].tolist()
    for b in range(len(samples)):
        a, e = bounds[b], bounds[b + 1]
        assert torch.equal(got[:, 0, a:e], ref[:, b, : e - a]), b
        assert int(got[:, 0, a].max()) == 0  # every sample starts again at 0


def _run(model, batch, num_items):
    model.zero_grad(set_to_none=True)
    out = model(**batch, num_items_in_batch=num_items)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("case", ["multimodal", "text_only"])
def test_packed_model_equals_padded(case):
    pieces = MODEL_SAMPLES if case == "multimodal" else [[("text", 4), ("answer", 8)], [("answer", 5)],
                                                          [("text", 3), ("answer", 9)]]
    samples = _samples(pieces, seed=10)
    padded = _collator()(samples)
    packed = _collator(packing=True, pad_to_multiple_of=16)(samples)
    model = _tiny_model()
    num_items = count_label_tokens(padded)
    assert count_label_tokens(packed) == num_items

    ref, ref_grads = _run(model, padded, num_items)
    out, grads = _run(model, packed, num_items)
    loss, ref_loss = float(out.loss.detach()), float(ref.loss.detach())
    assert abs(loss - ref_loss) <= MODEL_REL_TOL * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    if case == "multimodal":  # every parameter, the vision tower's included, gets a gradient
        assert len(grads) == len(list(model.parameters()))
    worst = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst <= MODEL_REL_TOL, worst
    bounds = packed["cu_seqlens"].tolist()
    for b, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b == len(samples):
            break  # the trailing padding segment
        assert _rel(out.logits[0, a:e].detach(), ref.logits[b, : e - a].detach()) <= MODEL_REL_TOL

    # The model keeps targets inside samples by itself too: with the collator's boundary masking
    # undone (sample 3 of the multimodal set starts with a target), the loss is unchanged.
    unmasked = dict(packed)
    unmasked["labels"] = torch.cat([s["labels"] for s in samples])[None]
    unmasked["labels"] = F.pad(unmasked["labels"], (0, bounds[-1] - unmasked["labels"].shape[1]), value=-100)
    assert count_label_tokens(unmasked) == num_items
    with torch.no_grad():
        again = model(**unmasked, num_items_in_batch=num_items).loss
    assert abs(float(again) - ref_loss) <= MODEL_REL_TOL * abs(ref_loss)


# --------------------------------------------------------------------------------------------------
# Trainer end to end
# --------------------------------------------------------------------------------------------------


def test_training_with_packing_matches_padded_run(reference_run, warm_shapes_dir, tmp_path):
    from openspeed.config import load_config
    from openspeed.tasks.vlm_sft import VLMTask

    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir, data={"packing": True})
    # The task packs each micro-batch into one row, counting what the padded batch counts.
    task = VLMTask(load_config(config))
    packed = task.load_batch(task.train_set, [0, 1, 2])
    assert packed["input_ids"].shape[0] == 1 and packed["cu_seqlens"].numel() == 4
    task.collator.packing = False
    padded = task.load_batch(task.train_set, [0, 1, 2])
    assert task.count_targets(packed) == task.count_targets(padded) > 0
    assert task.count_tokens(packed) == task.count_tokens(padded) == packed["input_ids"].shape[1]

    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = str(tmp_path / "run")
    assert_curves_close(train_curve(run_dir), train_curve(ref_dir), rel=1e-4)

    def per_step(directory, key):
        return {r["step"]: r[key] for r in read_metrics(directory) if key in r and "loss" in r}

    # count_targets / count_tokens see the same label and real-token counts in both layouts.
    assert per_step(run_dir, "target_tokens") == per_step(ref_dir, "target_tokens")
