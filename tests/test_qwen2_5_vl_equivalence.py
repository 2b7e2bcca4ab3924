"""The native Qwen2.5-VL must match Hugging Face's ``Qwen2_5_VLForConditionalGeneration`` numerically.

Logits are compared at *every* position, padding included: the native model mirrors HF's masking
(padding keys hidden, causal order kept, right-padding queries still see the real prefix), so even
padding rows agree.
"""

from __future__ import annotations

import json

import pytest
import torch
from _qwen_tiny import (
    IMAGE_BATCH,
    TEXT_BATCH,
    VIDEO_BATCH,
    hf_config,
    make_batch,
    random_hf_model,
)
from safetensors.torch import save_file

import openspeed
from openspeed.errors import CheckpointError, ConfigError
from openspeed.models.loading import load_hf_state_dict
from openspeed.models.qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLModel,
    flops_breakdown,
    get_rope_index,
    hf_to_native,
    native_to_hf,
    reset_non_persistent_buffers,
)
from openspeed.models.registry import get_model_spec
from openspeed.ops.attention import attention

ATOL = 1e-4
# "unpadded" has a single sample, so its all-ones mask takes the model's no-mask (fused causal) path.
BATCHES = {"image": IMAGE_BATCH, "video": VIDEO_BATCH, "text": TEXT_BATCH, "unpadded": IMAGE_BATCH[1:]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random HF model saved as a sharded checkpoint, and the native model loaded from it."""
    hf = random_hf_model()
    path = tmp_path_factory.mktemp("qwen_sharded")
    hf.save_pretrained(path, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    # transformers 5.23 writes the older hub key layout (visual.*, model.layers.*); the other layout
    # is covered by test_both_key_layouts_load.
    return hf, openspeed.from_pretrained(path), path


def _hf_forward(hf, batch):
    with torch.no_grad():
        return hf(**batch)


def _native_forward(model, batch, **overrides):
    kwargs = {**batch, **overrides}
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize("name", list(BATCHES))
def test_logits_and_loss_match_hf(saved, name):
    hf, native, _ = saved
    batch = make_batch(BATCHES[name], seed=1)
    ref = _hf_forward(hf, batch)
    out = _native_forward(native, batch)
    diff = (out.logits - ref.logits).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.3e}")
    assert diff < ATOL
    assert out.loss is not None and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_gradients_match_hf(saved):
    hf, native, _ = saved
    batch = make_batch(VIDEO_BATCH, seed=9)
    hf.zero_grad()
    native.zero_grad()
    hf(**batch).loss.backward()
    native(**batch).loss.backward()
    hf_grads = hf_to_native({n: p.grad for n, p in hf.named_parameters()}, native.config)
    for name, param in native.named_parameters():
        torch.testing.assert_close(param.grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    hf.zero_grad(set_to_none=True)
    native.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["text", "image", "video"])
def test_vision_tower_runs_once_per_forward(saved, name):
    """One tower call per forward whatever the batch holds (images and videos together; a blank
    block for a text-only batch), so sharded ranks issue the same collectives. A text-only batch
    gives the tower an exactly zero gradient (and the HF logits, in test_logits_and_loss_match_hf)."""
    _, native, _ = saved
    calls = []
    handle = native.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    native.zero_grad(set_to_none=True)
    try:
        native(**make_batch(BATCHES[name], seed=3)).loss.backward()
    finally:
        handle.remove()
    assert len(calls) == 1
    grads = [p.grad for p in native.visual.parameters()]
    assert all(g is not None for g in grads)
    nonzero = sum(int(torch.count_nonzero(g)) for g in grads)
    assert (nonzero == 0) if name == "text" else (nonzero > 0)
    native.zero_grad(set_to_none=True)


def test_bf16_load_keeps_fp32_rotary(saved):
    _, native, path = saved
    model = openspeed.from_pretrained(path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.visual.rotary_pos_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(
        model.language_model.rotary_emb.inv_freq, native.language_model.rotary_emb.inv_freq, atol=0, rtol=0
    )
    batch = make_batch(IMAGE_BATCH, seed=10)
    low = _native_forward(model, batch).logits.float()
    assert (low - _native_forward(native, batch).logits).abs().max() < 0.1


@pytest.mark.parametrize("name", ["image", "video"])
def test_mm_token_type_ids_derived_and_rope_index_matches_hf(saved, name):
    hf, native, _ = saved
    batch = make_batch(BATCHES[name], seed=2)
    with_types = _native_forward(native, batch).logits
    derived = _native_forward(native, batch, mm_token_type_ids=None).logits
    assert torch.equal(with_types, derived)

    vision = native.config.vision
    ours, our_deltas = get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch.get("second_per_grid_ts"),
        batch["attention_mask"],
        vision.spatial_merge_size,
        vision.tokens_per_second,
    )
    theirs, their_deltas = hf.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        second_per_grid_ts=batch.get("second_per_grid_ts"),
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(ours, theirs)
    assert torch.equal(our_deltas, their_deltas.to(our_deltas.dtype))


def test_loss_with_num_items_in_batch_is_sum_over_count(saved):
    _, native, _ = saved
    batch = make_batch(IMAGE_BATCH, seed=3)
    mean = _native_forward(native, batch).loss
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    scaled = _native_forward(native, batch, num_items_in_batch=4 * tokens).loss
    torch.testing.assert_close(scaled, mean / 4, atol=1e-6, rtol=1e-6)


def test_tied_embeddings_load_without_lm_head(tmp_path):
    hf = random_hf_model(tie_word_embeddings=True, seed=4)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_hf_state_dict(tmp_path)
    native = openspeed.from_pretrained(tmp_path)
    assert native.lm_head.weight is native.language_model.embed_tokens.weight
    batch = make_batch(TEXT_BATCH, seed=5)
    diff = (_native_forward(native, batch).logits - _hf_forward(hf, batch).logits).abs().max()
    assert diff < ATOL


def _rewrite_checkpoint(dst, src, native, hub_layout: bool):
    """Copy checkpoint ``src`` to ``dst`` in one key layout, as a single unsharded file.

    ``hub_layout``: the pre-transformers-5 hub layout, with ``visual.*`` / ``model.layers.*`` keys and
    a flat config (decoder keys at the top, ``rope_scaling`` of type mrope, ``in_chans``). Otherwise the
    transformers-5 layout: ``model.visual.*`` / ``model.language_model.*`` keys and a nested config.
    """
    state = hf_to_native(load_hf_state_dict(src), native.config)
    if hub_layout:
        state = {
            ("model." + k[len("language_model.") :] if k.startswith("language_model.") else k): v
            for k, v in state.items()
        }
    else:
        state = native_to_hf(state, native.config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))

    config = native.config.to_hf_dict()
    if hub_layout:
        text, vision = config.pop("text_config"), config.pop("vision_config")
        rope = text.pop("rope_parameters")
        text.pop("model_type")
        config.update(text)
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        vision["model_type"] = "qwen2_5_vl"
        vision["in_chans"] = vision.pop("in_channels")
        vision.pop("rope_parameters")
        config["vision_config"] = vision
    (dst / "config.json").write_text(json.dumps(config))
    return set(state)


@pytest.mark.parametrize("hub_layout", [True, False], ids=["hub_layout", "transformers5_layout"])
def test_both_key_layouts_load(saved, tmp_path, hub_layout):
    hf, native, path = saved
    keys = _rewrite_checkpoint(tmp_path, path, native, hub_layout)
    assert ("visual.patch_embed.proj.weight" in keys) == hub_layout
    assert ("model.norm.weight" in keys) == hub_layout
    loaded = openspeed.from_pretrained(tmp_path)
    assert loaded.config == native.config
    batch = make_batch(IMAGE_BATCH, seed=6)
    diff = (_native_forward(loaded, batch).logits - _hf_forward(hf, batch).logits).abs().max()
    assert diff < ATOL


def test_meta_build_then_to_empty_and_reset(saved):
    _, native, _ = saved
    with torch.device("meta"):
        model = Qwen2_5_VLModel(native.config)
    model.to_empty(device="cpu")
    reset_non_persistent_buffers(model)
    model.load_state_dict(native.state_dict())
    batch = make_batch(VIDEO_BATCH, seed=7)
    torch.testing.assert_close(
        _native_forward(model.eval(), batch).logits, _native_forward(native, batch).logits, atol=0, rtol=0
    )


def test_config_round_trips_through_transformers(saved):
    from transformers import Qwen2_5_VLConfig as HFConfig

    _, native, _ = saved
    hf_dict = native.config.to_hf_dict()
    assert hf_dict["model_type"] == "qwen2_5_vl"
    assert hf_dict["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    reparsed = Qwen2_5_VLConfig.from_hf_dict(HFConfig(**json.loads(json.dumps(hf_dict))).to_dict())
    assert reparsed == native.config
    assert Qwen2_5_VLConfig.from_hf_dict(hf_config().to_dict()) == native.config


def test_loading_errors(saved, tmp_path):
    _, native, path = saved
    with pytest.raises(CheckpointError, match="not found"):
        openspeed.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        openspeed.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        openspeed.from_pretrained(tmp_path)

    state = native_to_hf(hf_to_native(load_hf_state_dict(path), native.config), native.config)
    state.pop("model.language_model.norm.weight")
    state["model.extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: language_model\.norm\.weight.*unexpected"):
        openspeed.from_pretrained(tmp_path)

    with pytest.raises(ConfigError, match="model type 'llama' is not supported"):
        get_model_spec("llama")


def test_flops_match_hand_count(saved):
    _, native, _ = saved
    cfg = native.config
    grid = [[1, 8, 8]]  # 64 patches, 16 merged tokens; windows of 2x2 merged tokens -> 4 x 16 patches
    text_tokens = 10
    flops = flops_breakdown(cfg, text_tokens, image_grid_thw=grid)

    def matmul_weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    llm_tokens = text_tokens + 16
    llm_weights = matmul_weights(native.language_model) + native.lm_head.weight.numel()
    vision_weights = native.visual.patch_embed.proj.weight.numel() + matmul_weights(native.visual.blocks)
    assert flops["llm_matmul"] == 6 * llm_weights * llm_tokens
    assert flops["vision_matmul"] == 6 * vision_weights * 64
    assert flops["merger_matmul"] == 6 * matmul_weights(native.visual.merger) * 16

    t, v = cfg.text, cfg.vision
    causal_pairs = llm_tokens * (llm_tokens + 1) // 2
    assert flops["llm_attention"] == 3 * 4 * causal_pairs * t.hidden_size * t.num_hidden_layers
    vision_pairs = 2 * 64**2 + 2 * 4 * 16**2  # 2 full blocks, 2 windowed blocks
    assert flops["vision_attention"] == 3 * 4 * vision_pairs * v.hidden_size
    assert get_model_spec("qwen2_5_vl").flops(cfg, text_tokens, grid) == sum(flops.values())


# --------------------------------------------------------------------------------------------------
# openspeed.ops.attention
# --------------------------------------------------------------------------------------------------


def _masked_softmax_attention(q, k, v, allowed, scale):
    """Reference: explicit scores, -inf where not ``allowed``, softmax, weighted values."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_cu_seqlens_never_crosses_segments():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 8, generator=gen)
    k, v = torch.randn(2, 1, 2, 20, 8, generator=gen)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    segment = torch.bucketize(torch.arange(20), cu[1:], right=True)
    block_diagonal = segment[:, None] == segment[None, :]
    for causal in (False, True):
        allowed = block_diagonal & torch.ones(20, 20, dtype=torch.bool).tril() if causal else block_diagonal
        out = attention(q, k, v, causal=causal, cu_seqlens=cu)
        torch.testing.assert_close(out, _masked_softmax_attention(q, k, v, allowed, 8**-0.5))


def test_attention_padding_and_causal_equals_explicit_mask():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 7, 8, generator=gen)
    k, v = torch.randn(2, 3, 2, 7, 8, generator=gen)  # grouped-query: 4 query heads, 2 kv heads
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [0] * 3 + [1] * 4])  # none, right, left padding
    out = attention(q, k, v, causal=True, attention_mask=mask, scale=0.3)
    assert torch.isfinite(out).all()  # left-padding queries see no key at all

    allowed = torch.ones(7, 7, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    ref = _masked_softmax_attention(q, k, v, allowed, 0.3)
    rows = allowed.any(-1)  # queries with at least one visible key; the others are free
    torch.testing.assert_close(out[rows.expand_as(out[..., 0])], ref[rows.expand_as(ref[..., 0])])


def test_attention_gqa_equals_repeated_kv():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 2, 9, 8, generator=gen)
    for causal in (False, True):
        out = attention(q, k, v, causal=causal)
        ref = attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), causal=causal)
        torch.testing.assert_close(out, ref)


def test_invalid_config_is_a_config_error():
    d = hf_config().to_dict()
    d["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen2_5_VLConfig.from_hf_dict(d)


def test_rope_index_without_mask_matches_hf_on_unpadded_rows(saved):
    hf, native, _ = saved
    batch = make_batch([IMAGE_BATCH[0]], seed=8)
    ours, _ = get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        None,
        None,
        None,
        native.config.vision.spatial_merge_size,
        native.config.vision.tokens_per_second,
    )
    theirs, _ = hf.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
    )
    assert torch.equal(ours, theirs)
