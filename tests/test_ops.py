"""Fast paths of ``openspeed/ops`` against their references, forward and backward, fp32 and bf16.

References are checked against the model layers they restate (``models/layers``, ``causal_lm_loss``,
``torch.optim.AdamW``); fast paths against the references. ``OPENSPEED_OPS_TEST_DEVICE=cuda`` runs the
same checks on a GPU.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from openspeed.errors import ConfigError
from openspeed.models.layers import rope as layer_rope
from openspeed.models.layers.mlp import SwiGLUMLP
from openspeed.models.layers.norms import RMSNorm
from openspeed.models.qwen2_5_vl.model import causal_lm_loss
from openspeed.ops import adamw, cross_entropy, rms_norm, rope, swiglu
from openspeed.ops.level import optimization_level_scope

DEVICE = torch.device(os.environ.get("OPENSPEED_OPS_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _layers_at_level_0():
    # The model layers dispatch on the optimization level; here they stand for the reference formulas
    # (level 0), and each op's fast path is chosen explicitly with ``fast=``.
    with optimization_level_scope(0):
        yield


def randn(*shape, dtype=torch.float32, scale=1.0, grad=True, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    t = (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(grad)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def assert_close(actual, expected, dtype):
    """fp32: rounding-level agreement; bf16: within bf16 rounding of the reference (one ulp, 2**-8 rel)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        scale = expected.float().abs().amax().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=2**-8 * scale)


def saved_bytes(fn):
    """Bytes of distinct storages saved for backward while ``fn()`` runs (the output is kept)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# ---------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
def test_rms_norm_matches_layer_and_reference(dtype, weight_dtype):
    x = randn(3, 17, 96, dtype=dtype, scale=3.0, seed=0)
    w_dtype = dtype if weight_dtype == "same" else torch.float32
    weight = randn(96, dtype=w_dtype, seed=1)
    layer = RMSNorm(96, eps=1e-5).to(device=DEVICE, dtype=w_dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    expected = layer(x)
    g = randn(*expected.shape, dtype=expected.dtype, grad=False, seed=2)
    layer_grads = grads(expected, (x, layer.weight), g)

    ref = rms_norm.rms_norm_reference(x, weight, 1e-5)
    assert torch.equal(ref, expected)
    ref_grads = grads(ref, (x, weight), g)
    for a, b in zip(ref_grads, layer_grads):
        assert torch.equal(a, b)

    fast = rms_norm.rms_norm(x, weight, 1e-5, fast=True)
    assert_close(fast, ref, dtype)
    fast_grads = grads(fast, (x, weight), g)
    for a, b in zip(fast_grads, ref_grads):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fast_saves_only_input_and_rstd(dtype):
    x = randn(64, 128, dtype=dtype, seed=0)
    weight = randn(128, dtype=dtype, seed=1)
    ref_bytes, _ = saved_bytes(lambda: rms_norm.rms_norm_reference(x, weight))
    fast_bytes, out = saved_bytes(lambda: rms_norm.rms_norm(x, weight))
    elem = x.element_size()
    # input + weight + one fp32 rstd per row, nothing of x's size in fp32
    assert fast_bytes == 64 * 128 * elem + 128 * elem + 64 * 4
    assert fast_bytes < ref_bytes
    # frozen weight: only the input gradient
    (gx,) = grads(rms_norm.rms_norm(x, weight.detach()), (x,), torch.ones_like(out))
    (gx_ref,) = grads(rms_norm.rms_norm_reference(x, weight.detach()), (x,), torch.ones_like(out))
    assert_close(gx, gx_ref, dtype)


# ---------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_fast_is_bitwise_reference_and_saves_a_third_less(dtype):
    mlp = SwiGLUMLP(48, 80, bias=False).to(device=DEVICE, dtype=dtype)
    x = randn(2, 9, 48, dtype=dtype, seed=0)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(mlp.down_proj(swiglu.swiglu_reference(gate, up)), mlp(x))

    g = randn(2, 9, 80, dtype=dtype, grad=False, seed=1)
    ref_bytes, ref = saved_bytes(lambda: swiglu.swiglu_reference(gate, up))
    fast_bytes, fast = saved_bytes(lambda: swiglu.swiglu(gate, up, fast=True))
    assert torch.equal(fast, ref)
    for a, b in zip(grads(fast, (gate, up), g), grads(ref, (gate, up), g)):
        assert torch.equal(a, b)
    assert fast_bytes * 3 == ref_bytes * 2  # gate and up, not silu(gate)


# ---------------------------------------------------------------------------------------------------
# Rotary embeddings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_tables_and_rotation_match_layers(dtype):
    head_dim, section = 32, (4, 6, 6)
    positions = torch.randint(0, 40, (3, 2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    emb = layer_rope.MRopeEmbedding(head_dim, 1e6, section).to(DEVICE)
    cos, sin = emb(positions, dtype)
    for fn in (rope.mrope_cos_sin_reference, rope.mrope_cos_sin):
        c, s = fn(emb.inv_freq, positions, section, dtype)
        assert torch.equal(c, cos) and torch.equal(s, sin)

    # q as the attention builds it: (batch, seq, heads, dim) transposed; k with fewer heads (GQA)
    q = randn(2, 11, 4, head_dim, dtype=dtype, seed=1).detach().transpose(1, 2).requires_grad_()
    k = randn(2, 2, 11, head_dim, dtype=dtype, seed=2)
    expected = layer_rope.apply_rotary(q, k, cos, sin)
    ref = rope.apply_rotary_reference(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(ref, expected))
    fast = rope.apply_rotary(q, k, cos, sin, fast=True)
    g = (
        randn(2, 4, 11, head_dim, dtype=dtype, grad=False, seed=3),
        randn(2, 2, 11, head_dim, dtype=dtype, grad=False, seed=4),
    )
    for a, b in zip(fast, ref):
        assert_close(a, b, dtype)
    for a, b in zip(grads(fast, (q, k), g), grads(ref, (q, k), g)):
        assert_close(a, b, dtype)


def test_rope_1d_equals_mrope_with_equal_axes_and_unsqueeze_dim_2():
    head_dim = 16
    inv_freq = rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE)
    pos = torch.arange(7, device=DEVICE)[None].expand(2, 7)
    cos, sin = rope.rope_cos_sin(inv_freq, pos)
    mcos, msin = rope.mrope_cos_sin(inv_freq, pos[None].expand(3, 2, 7), (2, 3, 3), torch.float32)
    assert torch.equal(cos, mcos) and torch.equal(sin, msin)
    # (batch, seq, heads, dim) layout: the head axis goes at dim 2
    q, k = randn(2, 7, 3, head_dim, seed=0), randn(2, 7, 1, head_dim, seed=1)
    ref = rope.apply_rotary_reference(q, k, cos, sin, unsqueeze_dim=2)
    fast = rope.apply_rotary(q, k, cos, sin, unsqueeze_dim=2)
    g = (torch.ones_like(ref[0]), torch.ones_like(ref[1]))
    for a, b in zip(fast + grads(fast, (q, k), g), ref + grads(ref, (q, k), g)):
        assert_close(a, b, torch.float32)
    # a rotation: norms of each (i, i + dim/2) pair are kept
    pair_norm = lambda t: t[..., :8].pow(2) + t[..., 8:].pow(2)  # noqa: E731
    torch.testing.assert_close(pair_norm(fast[0]), pair_norm(q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_rotary_matches_layers(dtype):
    head_dim = 16
    emb = layer_rope.VisionRotaryEmbedding(head_dim).to(DEVICE)
    cos, sin = emb(torch.randint(0, 6, (13, 2), generator=torch.Generator().manual_seed(0)).to(DEVICE))
    q, k = randn(13, 3, head_dim, dtype=dtype, seed=1), randn(13, 3, head_dim, dtype=dtype, seed=2)
    expected = layer_rope.apply_vision_rotary(q, k, cos, sin)
    ref = rope.apply_vision_rotary_reference(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(ref, expected))
    fast = rope.apply_vision_rotary(q, k, cos, sin)
    g = (
        randn(13, 3, head_dim, dtype=dtype, grad=False, seed=3),
        randn(13, 3, head_dim, dtype=dtype, grad=False, seed=4),
    )
    for a, b in zip(fast + grads(fast, (q, k), g), ref + grads(ref, (q, k), g)):
        assert_close(a, b, dtype)


def test_video_rope_tables_follow_the_documented_layout():
    head_dim, theta, grid = 20, 10000.0, (2, 3, 4)  # 10 pairs: 4 frame, 3 row, 3 column
    assert rope.video_rope_split(head_dim) == (4, 3, 3)
    cos, sin = rope.video_rope_cos_sin(head_dim, grid, theta)
    assert cos.shape == (24, 10) and cos.dtype == torch.float32
    for f, h, w in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        token = (f * grid[1] + h) * grid[2] + w
        expected = [f * theta ** (-2 * i / 8) for i in range(4)]
        expected += [h * theta ** (-2 * i / 6) for i in range(3)]
        expected += [w * theta ** (-2 * i / 6) for i in range(3)]
        torch.testing.assert_close(cos[token], torch.tensor([math.cos(a) for a in expected]))
        torch.testing.assert_close(sin[token], torch.tensor([math.sin(a) for a in expected]))
    # channels (2i, 2i+1) rotate as one complex number by the pair's angle
    x = torch.randn(1, 24, 2, head_dim)
    out = rope.apply_video_rotary_reference(x, cos, sin)
    a, b = x[0, 23, 1, 8], x[0, 23, 1, 9]  # token (1, 2, 3), pair 4: the first row pair, angle 2
    torch.testing.assert_close(out[0, 23, 1, 8], a * math.cos(2.0) - b * math.sin(2.0))
    torch.testing.assert_close(out[0, 23, 1, 9], a * math.sin(2.0) + b * math.cos(2.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_video_rope_fast_matches_reference(dtype):
    head_dim = 24
    cos, sin = rope.video_rope_cos_sin(head_dim, (2, 3, 3), device=DEVICE)
    x = randn(2, 18, 3, head_dim, dtype=dtype, seed=0)
    g = randn(2, 18, 3, head_dim, dtype=dtype, grad=False, seed=1)
    ref = rope.apply_video_rotary(x, cos, sin, fast=False)
    fast = rope.apply_video_rotary(x, cos, sin, fast=True)
    shared = rope.apply_video_rotary(x, rotation=rope.video_rope_rotation(cos, sin))
    assert_close(fast, ref, dtype)
    assert torch.equal(shared, fast)
    assert_close(grads(fast, x, g)[0], grads(ref, x, g)[0], dtype)
    with pytest.raises(ValueError, match="tables"):
        rope.apply_video_rotary(x[:, :9], cos, sin)


# ---------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# ---------------------------------------------------------------------------------------------------


def _ce_inputs(dtype, n=150, hidden=32, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::4] = -100
    targets[-7:] = -100
    h = randn(n, hidden, dtype=dtype, seed=seed + 1)
    w = randn(vocab, hidden, dtype=dtype, scale=0.3, seed=seed + 2)
    return h, w, targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("divisor", [None, 97, "tensor"])
def test_fused_linear_cross_entropy_matches_reference(dtype, recompute, divisor):
    h, w, targets = _ce_inputs(dtype)
    if divisor == "tensor":
        divisor = torch.tensor(61, device=DEVICE)
    explicit = F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")
    explicit = explicit / (divisor if divisor is not None else (targets != -100).sum())
    ref = cross_entropy.linear_cross_entropy_reference(h, w, targets, divisor=divisor)
    torch.testing.assert_close(ref, explicit, rtol=1e-6, atol=1e-6)
    ref_grads = grads(ref, (h, w), None)

    # 40-token chunks: 150 tokens end on a partial chunk
    fast = cross_entropy.fused_linear_cross_entropy(
        h, w, targets, divisor=divisor, chunk_size=40, recompute=recompute
    )
    assert fast.dtype == torch.float32
    fast_grads = grads(fast, (h, w), None)
    if dtype == torch.float32:
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(fast_grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    else:
        torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-3)
        for a, b in zip(fast_grads, ref_grads):
            assert_close(a, b, dtype)


def test_fused_cross_entropy_with_no_labelled_rows_gives_zero_loss_and_gradients():
    # Only labelled rows enter the LM head; with none, the loss and both gradients are exactly zero.
    h, w, targets = _ce_inputs(torch.float32, n=40)
    targets = torch.full_like(targets, -100)
    fast = cross_entropy.fused_linear_cross_entropy(h, w, targets, divisor=5, chunk_size=16)
    ref = cross_entropy.linear_cross_entropy_reference(h, w, targets, divisor=5)
    assert fast.item() == ref.item() == 0.0
    for g in grads(fast, (h, w), None):
        assert g.abs().max().item() == 0.0


def test_fused_cross_entropy_frozen_head_eval_and_saved_bytes():
    h, w, targets = _ce_inputs(torch.float32, n=256, vocab=2000)
    ref = cross_entropy.linear_cross_entropy_reference(h, w.detach(), targets)
    fast = cross_entropy.fused_linear_cross_entropy(h, w.detach(), targets, chunk_size=64)
    (g_fast,) = grads(fast, (h,), None)
    (g_ref,) = grads(ref, (h,), None)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy.fused_linear_cross_entropy(h, w, targets), ref)

    ref_bytes, _ = saved_bytes(lambda: cross_entropy.linear_cross_entropy_reference(h, w, targets))
    logits_bytes = 256 * 2000 * 4
    for recompute in (False, True):
        fast_bytes, out = saved_bytes(
            lambda recompute=recompute: cross_entropy.fused_linear_cross_entropy(
                h, w, targets, chunk_size=64, recompute=recompute
            )
        )
        assert ref_bytes > logits_bytes > fast_bytes  # never the (N, V) logits
    # stash mode scales its stashed gradients in place: a second backward must refuse
    out = cross_entropy.fused_linear_cross_entropy(h, w, targets, chunk_size=64)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_causal_lm_loss_from_hidden_matches_model_loss():
    h = randn(2, 9, 16, seed=0)
    head = torch.nn.Linear(16, 50, bias=False).to(DEVICE)
    labels = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels[0, :3] = -100
    for count in (None, 11):
        expected = causal_lm_loss(head(h), labels, count)
        got = cross_entropy.causal_lm_loss_from_hidden(h, head.weight, labels, count, chunk_size=5)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        g_exp = grads(expected, (h, head.weight), None)
        g_got = grads(got, (h, head.weight), None)
        for a, b in zip(g_got, g_exp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# AdamW + EMA
# ---------------------------------------------------------------------------------------------------

SHAPES = [(13, 7), (7,), (3, 4, 5)]


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype)) for s in SHAPES]


def _groups(params, **extra):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.3, **extra}]


def _run(opt, params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("fast", [False, True])
def test_adamw_ema_matches_torch_adamw_and_a_reference_ema(fast):
    torch_params, params = _params(), _params()
    _run(torch.optim.AdamW(_groups(torch_params), lr=1e-2, weight_decay=0.05), torch_params, 12)
    opt = adamw.AdamWEMA(_groups(params, ema_decay=0.8), lr=1e-2, weight_decay=0.05, ema_decay=0.9, fast=fast)
    # the EMA by hand: start at the initial values, then ema = d * ema + (1 - d) * param after each step
    emas = [p.detach().clone().double() for p in params]
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        opt.step()
        for i, p in enumerate(params):
            d = 0.9 if i < 2 else 0.8
            emas[i] = d * emas[i] + (1 - d) * p.detach().double()
    for p, tp, e in zip(params, torch_params, emas):
        # a few fp32 ulps: the fused CUDA kernel orders its arithmetic differently from torch's
        torch.testing.assert_close(p, tp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.ema(p).double(), e, rtol=1e-6, atol=1e-6)


def test_adamw_fast_equals_reference_in_bf16_with_fp32_ema():
    runs = {}
    for fast in (False, True):
        params = _params(torch.bfloat16)
        opt = adamw.AdamWEMA(_groups(params), lr=1e-2, ema_decay=0.99, fast=fast)
        _run(opt, params, 5)
        runs[fast] = (params, opt)
    torch_params = _params(torch.bfloat16)
    _run(torch.optim.AdamW(_groups(torch_params), lr=1e-2), torch_params, 5)
    for p_ref, p_fast, p_torch in zip(runs[False][0], runs[True][0], torch_params):
        assert torch.equal(p_ref, p_torch)
        # the fused kernel rounds to bf16 once per step, the reference after every op
        assert_close(p_fast.detach(), p_ref.detach(), torch.bfloat16)
        ema_ref, ema_fast = runs[False][1].ema(p_ref), runs[True][1].ema(p_fast)
        assert ema_fast.dtype == torch.float32
        torch.testing.assert_close(ema_fast, ema_ref, rtol=2**-7, atol=2**-8 * ema_ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_ema_state_dict_round_trip_and_ema_weights(dtype):
    straight = _params(dtype)
    opt = adamw.AdamWEMA(_groups(straight), lr=1e-2, ema_decay=0.9)
    _run(opt, straight, 3, seed=1)
    _run(opt, straight, 3, seed=2)

    resumed = _params(dtype)
    first = adamw.AdamWEMA(_groups(resumed), lr=1e-2, ema_decay=0.9)
    _run(first, resumed, 3, seed=1)
    state = first.state_dict()
    assert all("ema" in s for s in state["state"].values())
    second = adamw.AdamWEMA(_groups(resumed), lr=1e-2, ema_decay=0.9)
    second.load_state_dict(state)
    _run(second, resumed, 3, seed=2)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        assert torch.equal(opt.ema(p), second.ema(q))
        assert second.ema(q).dtype == torch.float32  # kept in fp32 for bf16 params too
        assert second.state[q]["step"].item() == 6

    trained = [p.detach().clone() for p in straight]
    with opt.ema_weights():
        for p in straight:
            assert torch.equal(p.detach(), opt.ema(p).to(dtype))
    assert all(torch.equal(p.detach(), t) for p, t in zip(straight, trained))


def test_adamw_ema_rejects_bad_settings():
    with pytest.raises(ConfigError, match="ema_decay"):
        adamw.AdamWEMA(_params(), ema_decay=1.5)
    with pytest.raises(ConfigError, match="betas"):
        adamw.AdamWEMA(_params(), betas=(0.9, 1.0))


def test_ops_do_not_import_the_models():
    """Model layers call into the ops, so the ops must not import ``openspeed.models`` (no cycles)."""
    code = (
        "import sys\n"
        "import openspeed.ops.adamw, openspeed.ops.cross_entropy\n"
        "import openspeed.ops.rms_norm, openspeed.ops.rope, openspeed.ops.swiglu\n"
        "print(sorted(m for m in sys.modules if m.startswith('openspeed.models')))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
