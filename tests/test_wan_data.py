"""Wan data, frozen parts, objective and sampling, checked in-process against references.

References: the moving-shapes renderer (for the checker and for decoding), diffusers' own
``WanPipeline`` loaded from the tiny pipeline (caption embeddings and the whole guided Euler sampling
loop), a hand-written flow-matching loss, and the model without recomputation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openspeed.config import load_config
from openspeed.errors import BadSampleError, ConfigError
from openspeed.models.wan.moving_shapes import (
    eval_prompts,
    make_moving_shapes,
    render_clip,
    score_clip,
    summarise_scores,
    vocabulary,
)

FRAMES, HEIGHT, WIDTH = 5, 16, 32
TEXT_LEN = 8


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline

    out = tmp_path_factory.mktemp("wan_pipe")
    return str(write_tiny_wan_pipeline(out, words=vocabulary(), seed=1,
                                       transformer=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    return str(make_moving_shapes(out, 6, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=2))


def _cfg(pipeline: str, train_path: str, *overrides: str):
    return load_config(None, [
        f"model.path={pipeline}", f"data.train_path={train_path}", f"data.video_buckets={FRAMES}x{HEIGHT}x{WIDTH}",
        f"data.text_len={TEXT_LEN}", "data.caption_dropout=0.5", "train.seed=3", "train.flow_shift=3.0",
        *overrides,
    ])


# --------------------------------------------------------------------------------------------------
# The moving-shapes checker
# --------------------------------------------------------------------------------------------------


def test_checker_scores_ground_truth_and_rejects_reversed_and_static():
    prompts = eval_prompts(32, seed=1)
    assert {p.split()[-1] for p in prompts[:8]} == {"left", "right", "up", "down"}
    rng = np.random.default_rng(0)
    truth, reversed_, static = [], [], []
    for prompt in prompts:
        _, colour, shape, _, direction = prompt.split()
        clip = render_clip(colour, shape, direction, offset=tuple(rng.uniform(-1, 1, 2)))
        truth.append(score_clip(clip, prompt))
        reversed_.append(score_clip(clip[::-1], prompt))
        static.append(score_clip(np.repeat(clip[:1], len(clip), axis=0), prompt))
    first8 = summarise_scores(truth[:8])
    assert first8["colour_correct"] == first8["direction_correct"] == 8
    assert summarise_scores(truth)["direction_correct"] == 32
    assert summarise_scores(reversed_[:8])["direction_correct"] <= 2
    assert summarise_scores(static[:8])["direction_correct"] <= 2
    assert all(s["direction"] == "static" for s in static)
    # Colour survives reversal; a blank clip has no colour at all.
    assert summarise_scores(reversed_)["colour_correct"] == 32
    assert score_clip(np.zeros((8, 16, 16, 3), np.uint8), prompts[0])["colour_ok"] is False


# --------------------------------------------------------------------------------------------------
# Data: decoding, buckets, bad samples
# --------------------------------------------------------------------------------------------------


def test_video_dataset_decodes_buckets_and_skips_bad_samples(tmp_path, clips, pipeline):
    from openspeed.data.video_text import VideoTextDataset, choose_bucket, write_video
    from openspeed.models.wan.task import WanFlowMatchingTask

    # Lossless clips decode to exactly what was rendered.
    dataset = VideoTextDataset(clips, [(FRAMES, HEIGHT, WIDTH)])
    sample = dataset[0]
    _, colour, shape, _, direction = sample["caption"].split()
    assert sample["video"].shape == (3, FRAMES, HEIGHT, WIDTH)
    assert float(sample["video"].min()) == -1.0

    # Bucket choice: closest aspect ratio among buckets the clip has frames for, then the larger.
    buckets = [(5, 16, 32), (5, 32, 32), (9, 16, 32)]
    assert choose_bucket(buckets, 9, 90, 160) == (9, 16, 32)
    assert choose_bucket(buckets, 6, 90, 160) == (5, 16, 32)
    assert choose_bucket(buckets, 6, 100, 100) == (5, 32, 32)
    assert choose_bucket(buckets, 4, 100, 100) is None
    # Resize to cover + centre crop: a 16x16 clip into 32x32 keeps a shape in the middle.
    square = tmp_path / "square.mkv"
    write_video(square, render_clip("red", "square", "right", frames=5, height=16, width=16, speed=0.0))
    rec = tmp_path / "one.jsonl"
    rec.write_text(json.dumps({"video": "square.mkv", "caption": "a red square moves right"}) + "\n")
    big = VideoTextDataset(rec, [(5, 32, 32)])[0]["video"]
    assert big.shape == (3, 5, 32, 32) and float(big[0, 0, 16, 16]) > 0.5 and float(big[0, 0, 0, 0]) == -1.0

    # Bad records: each one raises its reason and the task skips and counts it.
    corrupt = tmp_path / "corrupt.mkv"
    corrupt.write_bytes(b"\x1a\x45\xdf\xa3 not a video")
    short = tmp_path / "short.mkv"
    write_video(short, render_clip("red", "circle", "up", frames=3, height=16, width=32))
    lines = [
        json.dumps({"video": str(tmp_path / "missing.mkv"), "caption": "x"}),
        "{not json",
        json.dumps({"video": str(corrupt), "caption": "x"}),
        json.dumps({"video": str(short), "caption": "a red circle moves up"}),
        json.dumps({"caption": "no video"}),
        json.dumps({"video": str(square), "caption": "a red square moves right"}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    reasons = []
    data = VideoTextDataset(bad, [(FRAMES, HEIGHT, WIDTH)])
    for i in range(5):
        with pytest.raises(BadSampleError) as info:
            data[i]
        reasons.append(info.value.reason)
        assert "\n" not in str(info.value)
    assert reasons == ["missing_file", "malformed_record", "corrupt_media", "too_short", "malformed_record"]

    task = WanFlowMatchingTask(_cfg(pipeline, str(bad)))
    skips: dict[int, str] = {}
    batch = task.load_batch(task.train_set, [0, 1, 5], skips)
    assert [s["index"] for s in batch] == [5] and skips == {0: "missing_file", 1: "malformed_record"}
    # A micro-batch with nothing usable gets a weightless stand-in (ranks stay in lock-step).
    empty = task.load_batch(task.train_set, [2, 3], skips)
    assert task.count_samples(empty) == 0 and empty[0]["weight"] == 0.0
    assert skips[2] == "corrupt_media" and skips[3] == "too_short"


def test_config_errors_are_one_line(pipeline, clips):
    from openspeed.models.wan.task import WanFlowMatchingTask

    with pytest.raises(ConfigError, match="1 \\+ 4k"):
        WanFlowMatchingTask(_cfg(pipeline, clips, "data.video_buckets=4x16x32"))
    with pytest.raises(ConfigError, match="wan.vae=identity"):
        WanFlowMatchingTask(_cfg(pipeline, clips, "model.vae=identity"))
    for override, match in [("data.video_buckets=5x16", "FRAMESxHEIGHTxWIDTH"), ("model.lora.rank=-1", "lora.rank"),
                            ("train.ema_decay=1", "ema_decay"), ("data.caption_dropout=1", "caption_dropout")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(pipeline, clips, override)


# --------------------------------------------------------------------------------------------------
# Frozen parts and sampling against diffusers' WanPipeline
# --------------------------------------------------------------------------------------------------


def test_captions_and_guided_sampling_match_diffusers_pipeline(pipeline):
    from diffusers import WanPipeline

    import openspeed
    from openspeed.models.wan.generate import sample_latents
    from openspeed.models.wan.pipeline_io import load_frozen_parts

    reference = WanPipeline.from_pretrained(pipeline)
    reference.set_progress_bar_config(disable=True)
    parts = load_frozen_parts(pipeline, text_len=TEXT_LEN)
    prompts = ["a red square moves right", "a blue circle moves up"]
    ours = parts.encode_captions(prompts)
    with torch.no_grad():
        theirs = reference._get_t5_prompt_embeds(prompts, max_sequence_length=TEXT_LEN)
    assert float((ours - theirs).abs().max()) < 1e-6
    assert float(ours[0, 6:].abs().max()) == 0.0  # zero padding after "</s>"

    # The whole guided Euler loop, with diffusers' transformer vs the native one on the same weights.
    model = openspeed.from_pretrained(f"{pipeline}/transformer")
    latent_shape = parts.latent_shape(FRAMES, HEIGHT, WIDTH)
    noise = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    expected = reference(prompt=prompts, negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                         num_inference_steps=6, guidance_scale=4.0, latents=noise.clone(),
                         max_sequence_length=TEXT_LEN, output_type="latent").frames
    null = parts.encode_caption("")[None]
    got = sample_latents(model, ours, null, noise.clone(), steps=6, guidance=4.0,
                         shift=reference.scheduler.config.shift)
    err = float((got - expected).abs().max())
    print(f"sampling vs diffusers WanPipeline: max |diff| = {err:.2e}")
    assert err < 1e-4 and float((got - noise).abs().max()) > 0.1

    # The VAE round trip runs in the normalised latent space diffusers decodes from.
    video = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH) * 2 - 1
    latent = parts.encode_video(video)
    mean = torch.tensor(parts.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(parts.vae.config.latents_std).view(1, -1, 1, 1, 1)
    mode = parts.vae.encode(video).latent_dist.mode()
    assert torch.allclose(latent, (mode - mean) / std, atol=1e-6)
    assert parts.decode_latent(latent).shape == video.shape


# --------------------------------------------------------------------------------------------------
# The flow-matching objective
# --------------------------------------------------------------------------------------------------


def test_flow_matching_loss_equals_hand_computed(pipeline, clips):
    import openspeed
    from openspeed.models.wan.task import WanFlowMatchingTask, sample_generator, shift_sigma

    cfg = _cfg(pipeline, clips)
    task = WanFlowMatchingTask(cfg)
    model = openspeed.from_pretrained(f"{pipeline}/transformer")
    encoded = [task.encode_sample(s) for s in task.load_batch(task.train_set, [0, 1, 2, 3])]
    step = 7
    got = task.batch_loss(model, encoded, step, num_samples=5)

    expected, dropped = 0.0, 0
    for s in encoded:
        gen = sample_generator(cfg.train.seed, step, s["index"])
        drop = bool(torch.rand((), generator=gen) < 0.5)
        u = torch.rand((), generator=gen, dtype=torch.float64)
        sigma = float(3.0 * u / (1 + 2.0 * u))
        noise = torch.randn(s["latent"].shape, generator=gen)
        x0 = s["latent"]
        text = task.parts.encode_caption("" if drop else s["caption"])
        with torch.no_grad():
            pred = model(hidden_states=((1 - sigma) * x0 + sigma * noise)[None],
                         timestep=torch.tensor([sigma * 1000]), encoder_hidden_states=text[None]).sample[0]
        expected += float((pred - (noise - x0)).square().mean())
        dropped += drop
    expected /= 5
    print(f"flow-matching loss {float(got):.6f} vs hand-computed {expected:.6f}; {dropped} of 4 captions dropped")
    assert abs(float(got) - expected) < 1e-6
    assert 0 < dropped < 4  # dropout 0.5: this seed drops some, not all
    assert float(shift_sigma(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    # Same draws whatever the batch: one sample alone gives its share of the loss.
    alone = task.batch_loss(model, encoded[:1], step, num_samples=1) + task.batch_loss(model, encoded[1:], step, num_samples=1)
    assert float(alone) == pytest.approx(float(got) * 5, rel=1e-5)


def test_full_recompute_keeps_loss_and_gradients(pipeline, clips):
    import openspeed
    from openspeed.memory.recompute import apply_recompute
    from openspeed.models.wan.memory_plan import memory_plan
    from openspeed.models.wan.task import WanFlowMatchingTask

    task = WanFlowMatchingTask(_cfg(pipeline, clips))
    encoded = [task.encode_sample(s) for s in task.load_batch(task.train_set, [0, 1])]
    results = []
    for recompute in (False, True):
        model = openspeed.from_pretrained(f"{pipeline}/transformer").train()
        if recompute:
            regions = apply_recompute(model, "full", plan=memory_plan(model))
            assert regions == ["blocks.0", "blocks.1"]
        loss = task.batch_loss(model, encoded, 1, 2)
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    assert max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a) < 1e-6


# --------------------------------------------------------------------------------------------------
# Image-to-video
# --------------------------------------------------------------------------------------------------


def test_image_to_video_objective_and_sampling(tmp_path):
    from PIL import Image

    import openspeed
    from openspeed.models.wan.generate import TrainedDiT, generate_videos
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline
    from openspeed.models.wan.task import WanFlowMatchingTask

    pipe = write_tiny_wan_pipeline(tmp_path / "i2v", image_to_video=True, words=vocabulary(), seed=2)
    clips = make_moving_shapes(tmp_path / "clips", 2, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=4)
    lines = clips.read_text().splitlines()
    Image.new("RGB", (40, 20), (0, 200, 0)).save(tmp_path / "clips" / "first.png")
    first = json.loads(lines[1])
    first["first_frame"] = "first.png"
    clips.write_text(lines[0] + "\n" + json.dumps(first) + "\n")
    cfg = load_config(None, [f"model.path={pipe}", f"data.train_path={clips}",
                             f"data.video_buckets={FRAMES}x{HEIGHT}x{WIDTH}", "data.text_len=512"])
    with pytest.raises(ConfigError, match="512"):
        WanFlowMatchingTask(load_config(None, [f"model.path={pipe}", f"data.train_path={clips}",
                                               f"data.video_buckets={FRAMES}x{HEIGHT}x{WIDTH}", "data.text_len=8"]))
    task = WanFlowMatchingTask(cfg)
    encoded = [task.encode_sample(s) for s in task.load_batch(task.train_set, [0, 1])]
    # [mask (4 channels: 1 on the first latent frame); latent of the first frame then black frames]
    assert encoded[0]["condition"].shape == (8, 2, 2, 4) and encoded[0]["image"].shape == (17, 32)
    assert float(encoded[0]["condition"][:4, 0].min()) == 1.0 and float(encoded[0]["condition"][:4, 1].max()) == 0.0
    # record 1 is conditioned on its first_frame image, not on its own first frame
    green = Image.open(tmp_path / "clips" / "first.png").convert("RGB")
    assert torch.allclose(encoded[1]["image"], task.parts.encode_image([green])[0])
    assert not torch.allclose(encoded[0]["image"], encoded[1]["image"], atol=1e-3)
    model = openspeed.from_pretrained(f"{pipe}/transformer")
    loss = task.batch_loss(model, encoded, 1, 2).detach()
    assert torch.isfinite(loss) and float(loss) > 0

    trained = TrainedDiT(model, model.config, cfg, str(tmp_path), None, 0, False, [])
    red, blue = Image.new("RGB", (16, 32), (255, 0, 0)), Image.new("RGB", (16, 32), (0, 0, 255))
    kwargs = dict(steps=2, guidance=3.0, seed=0, parts=task.parts)
    a = generate_videos(trained, ["a red square moves up"], images=[red], **kwargs)
    b = generate_videos(trained, ["a red square moves up"], images=[blue], **kwargs)
    assert a.shape == (1, 3, FRAMES, HEIGHT, WIDTH) and float((a - b).abs().max()) > 1e-3
