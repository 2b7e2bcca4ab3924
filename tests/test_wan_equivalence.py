"""The native Wan DiT must equal diffusers' ``WanTransformer3DModel`` on tiny random configs.

Reference models are built by diffusers from a fixed seed, their weights perturbed (so norm scales
and biases are not the trivial ones/zeros), saved with ``save_pretrained`` and loaded natively with
``openspeed.from_pretrained``. Outputs must agree within 1e-4 in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _spawn import run_workers

import openspeed
from openspeed.errors import CheckpointError, ConfigError
from openspeed.models.loading import DIFFUSERS_WEIGHTS_INDEX_NAME, DIFFUSERS_WEIGHTS_NAME
from openspeed.models.wan import WanConfig, WanTransformer, hf_to_native, native_to_hf, training_flops

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

ATOL = 1e-4
TEXT_TOKENS = 512  # what the I2V cross-attention assumes (the text encoder's padded length)

# Heads x head_dim 2 x 32: RoPE splits the head as 12 (frames) + 10 (rows) + 10 (columns), so a mix-up
# of the axes shows. Patch grids below have a different size on each axis for the same reason.
TINY = dict(
    num_attention_heads=2, attention_head_dim=32, in_channels=8, out_channels=4, text_dim=32,
    freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=16,
)
I2V = dict(TINY, in_channels=12, image_dim=24, added_kv_proj_dim=64)


def _reference(seed: int = 0, **config) -> WanTransformer3DModel:
    """A diffusers model with every parameter perturbed away from its (trivial) initial value."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _save_and_load(model: WanTransformer3DModel, directory: Path, **save_kwargs) -> torch.nn.Module:
    model.save_pretrained(str(directory), safe_serialization=True, **save_kwargs)
    return openspeed.from_pretrained(directory)


def _inputs(batch: int, channels: int, latent: tuple[int, int, int], text_tokens: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, channels, *latent, generator=gen),
        "timestep": torch.tensor([937.0, 41.5][:batch]),
        "encoder_hidden_states": torch.randn(batch, text_tokens, TINY["text_dim"], generator=gen),
    }


def _max_err(ref: WanTransformer3DModel, native: torch.nn.Module, inputs: dict) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        expected = ref(**inputs).sample
        got = native(**inputs).sample
    assert got.shape == expected.shape
    return float((got - expected).abs().max()), got


@pytest.mark.parametrize(
    "case",
    [
        # Wan2.1 T2V layout.
        dict(config=dict(patch_size=(1, 2, 2)), latent=(3, 4, 10), per_token_timestep=False),
        # Temporal patches, no cross-attention norm, one timestep per token (Wan2.2 TI2V style).
        dict(config=dict(patch_size=(2, 2, 2), cross_attn_norm=False), latent=(4, 6, 10),
             per_token_timestep=True),
    ],
    ids=["wan2.1", "temporal_patch_per_token_t"],
)
def test_text_to_video_matches_diffusers(tmp_path, case):
    ref = _reference(**TINY, **case["config"])
    native = _save_and_load(ref, tmp_path)
    inputs = _inputs(2, TINY["in_channels"], case["latent"], text_tokens=7)
    if case["per_token_timestep"]:
        p_t, p_h, p_w = case["config"]["patch_size"]
        f, h, w = case["latent"]
        inputs["timestep"] = torch.rand(2, (f // p_t) * (h // p_h) * (w // p_w)) * 1000
    err, got = _max_err(ref, native, inputs)
    print(f"t2v {case['config']}: max |native - diffusers| = {err:.2e}")
    assert err < ATOL
    assert got.abs().max() > 0.1  # a real signal, not two zeros
    (as_tuple,) = native(**inputs, return_dict=False)
    assert torch.equal(as_tuple, got)


@pytest.mark.parametrize("pos_embed_seq_len", [None, 10], ids=["i2v", "first_last_frame"])
def test_image_to_video_matches_diffusers(tmp_path, pos_embed_seq_len):
    ref = _reference(**I2V, pos_embed_seq_len=pos_embed_seq_len)
    # Sharded save: the diffusers index file and its shards must load too.
    native = _save_and_load(ref, tmp_path, max_shard_size="40KB")
    assert (tmp_path / DIFFUSERS_WEIGHTS_INDEX_NAME).is_file()
    inputs = _inputs(2, I2V["in_channels"], (3, 4, 6), text_tokens=TEXT_TOKENS)
    # The first-last-frame model stacks both frames' CLIP tokens on the batch axis.
    image_batch = 2 if pos_embed_seq_len is None else 4
    gen = torch.Generator().manual_seed(2)
    inputs["encoder_hidden_states_image"] = torch.randn(image_batch, 5, I2V["image_dim"], generator=gen)
    err, got = _max_err(ref, native, inputs)
    print(f"i2v pos_embed_seq_len={pos_embed_seq_len}: max |native - diffusers| = {err:.2e}")
    assert err < ATOL

    # The image tokens matter: another image changes the output, and both sides still agree.
    inputs["encoder_hidden_states_image"] = torch.randn(image_batch, 5, I2V["image_dim"], generator=gen)
    err_other, got_other = _max_err(ref, native, inputs)
    assert err_other < ATOL
    assert float((got_other - got).abs().max()) > 1e-2


def test_state_dict_round_trip_and_config(tmp_path):
    ref = _reference(**I2V, pos_embed_seq_len=10)
    ref_state = ref.state_dict()
    native = _save_and_load(ref, tmp_path)
    native_state = native.state_dict()

    as_diffusers = native_to_hf(native_state, native.config)
    assert sorted(as_diffusers) == sorted(ref_state)
    for key, value in as_diffusers.items():
        assert torch.equal(value, ref_state[key]), key
    back = hf_to_native(as_diffusers, native.config)
    assert sorted(back) == sorted(native_state)
    assert all(torch.equal(back[k], native_state[k]) for k in back)
    # Native names are the readable ones, not diffusers'.
    assert "blocks.1.cross_attn.image_k_proj.weight" in native_state
    assert "blocks.0.self_attn.q_norm.weight" in native_state
    assert not any(".attn1." in k or "condition_embedder" in k for k in native_state)

    # config.json -> WanConfig -> config.json builds the same diffusers model.
    on_disk = json.loads((tmp_path / "config.json").read_text())
    config = WanConfig.from_hf_dict(on_disk)
    assert config == native.config
    rebuilt = WanTransformer3DModel.from_config(config.to_hf_dict())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    assert WanConfig.from_hf_dict(config.to_hf_dict()) == config


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    ref = _reference(**TINY)
    ref.save_pretrained(str(tmp_path / "good"))

    corrupt = tmp_path / "corrupt"
    ref.save_pretrained(str(corrupt))
    weights = corrupt / DIFFUSERS_WEIGHTS_NAME
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    with pytest.raises(CheckpointError) as info:
        openspeed.from_pretrained(corrupt)
    assert DIFFUSERS_WEIGHTS_NAME in str(info.value) and "\n" not in str(info.value)

    missing = tmp_path / "missing"
    ref.save_pretrained(str(missing))
    (missing / DIFFUSERS_WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError) as info:
        openspeed.from_pretrained(missing)
    assert DIFFUSERS_WEIGHTS_NAME in str(info.value) and "\n" not in str(info.value)

    # A weight missing from the file: named (natively) in one line.
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    ref.save_pretrained(str(partial))
    state = load_file(str(partial / DIFFUSERS_WEIGHTS_NAME))
    del state["blocks.1.attn2.to_k.weight"]
    save_file(state, str(partial / DIFFUSERS_WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.cross_attn\.k_proj\.weight") as info:
        openspeed.from_pretrained(partial)
    assert "\n" not in str(info.value)

    bad_config = json.loads((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(ConfigError, match="attention_head_dim"):
        WanConfig.from_hf_dict({**bad_config, "attention_head_dim": 15})
    with pytest.raises(ConfigError, match="_class_name"):
        WanConfig.from_hf_dict({**bad_config, "_class_name": "CogVideoXTransformer3DModel"})


def test_input_errors_and_tensor_parallel_sizes(tmp_path):
    native = _save_and_load(_reference(**TINY), tmp_path)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        native(**_inputs(1, TINY["in_channels"], (17, 2, 2), text_tokens=3))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        native(**_inputs(1, TINY["in_channels"], (1, 3, 4), text_tokens=3))
    with pytest.raises(ValueError, match="image_dim"):
        native(**_inputs(1, TINY["in_channels"], (1, 2, 2), text_tokens=3),
               encoder_hidden_states_image=torch.randn(1, 2, 24))

    from openspeed.models.registry import get_model_spec

    spec = get_model_spec("WanTransformer3DModel")
    dims = SimpleNamespace(sizes={"tp": 3}, dp_enabled=False)
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide num_attention_heads=2"):
        spec.parallelize(native, dims, SimpleNamespace(parallel=SimpleNamespace(zero_stage=3),
                                                    train=SimpleNamespace(precision="fp32")))
    assert spec.part_of("blocks.0.ffn.fc1.weight") == "blocks"
    assert spec.flops is training_flops


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_flops_equal_counted_flops(image):
    """Analytic FLOPs = 3 x the forward's matmul/conv/attention FLOPs counted by torch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = WanConfig(**(I2V if image else TINY))
    model = WanTransformer(config)
    text_tokens = 520  # > 512: under I2V the first 8 + 5 image tokens go through the image K/V
    inputs = _inputs(2, config.in_channels, (3, 4, 10), text_tokens=text_tokens)
    if image:
        inputs["encoder_hidden_states_image"] = torch.randn(2, 5, config.image_dim)
    # The math backend decomposes attention into matmuls the counter sees.
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(**inputs)
    expected = training_flops(config, text_tokens, [(3, 4, 10)] * 2, num_image_tokens=5 if image else 0)
    assert 3 * counter.get_total_flops() == expected


# --------------------------------------------------------------------------------------------------
# FSDP2: two CPU processes (gloo) must match one process, forward and gradients
# --------------------------------------------------------------------------------------------------


def _fsdp_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.mesh import build_mesh
    from openspeed.models.init import copy_full_into
    from openspeed.models.registry import get_model_spec

    spec = get_model_spec("WanTransformer3DModel")
    config = WanConfig(**I2V)
    full = torch.load(os.path.join(out_dir, "weights.pt"))
    inputs = torch.load(os.path.join(out_dir, "inputs.pt"))

    reference = WanTransformer(config)
    reference.load_state_dict(full)
    ref_out = reference(**inputs).sample
    ref_out.square().mean().backward()
    # Each rank takes its own sample; FSDP sums gradients over ranks (the loss carries the global
    # normalisation, as in training), so the sum equals the reference's full-batch gradient.
    local = {k: v[rank : rank + 1] for k, v in inputs.items()}

    dims = build_mesh({"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 1}, "cpu")
    with torch.device("meta"):
        model = spec.build(config)
    spec.parallelize(model, dims, SimpleNamespace(parallel=SimpleNamespace(zero_stage=3),
                                                    train=SimpleNamespace(precision="fp32")))
    model.to_empty(device="cpu")
    spec.reset_buffers(model)
    for name, param in model.named_parameters():
        copy_full_into(param, full[name])
    out = model(**local).sample
    (out.square().sum() / ref_out.numel()).backward()

    diffs = {"output": float((out - ref_out[rank : rank + 1]).detach().abs().max())}
    ref_params = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), f"{name} is not sharded"
        grad = param.grad.full_tensor()
        worst = max(worst, float((grad - ref_params[name].grad).abs().max()))
    diffs["grad"] = worst
    if rank == 0:
        with open(os.path.join(out_dir, "diffs.json"), "w", encoding="utf-8") as fh:
            json.dump(diffs, fh)


def test_fsdp_per_block_matches_one_process(tmp_path):

    config = WanConfig(**I2V)
    torch.manual_seed(3)
    model = WanTransformer(config)
    full = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save(full, tmp_path / "weights.pt")
    inputs = _inputs(2, config.in_channels, (3, 4, 6), text_tokens=TEXT_TOKENS)
    inputs["encoder_hidden_states_image"] = torch.randn(2, 5, config.image_dim)
    torch.save(inputs, tmp_path / "inputs.pt")

    run_workers(_fsdp_worker, 2, str(tmp_path))
    diffs = json.loads((tmp_path / "diffs.json").read_text())
    print(f"fsdp dp_shard=2: {diffs}")
    assert diffs["output"] < 1e-5 and diffs["grad"] < 1e-5
