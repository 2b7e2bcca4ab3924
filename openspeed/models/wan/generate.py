"""Text-to-video / image-to-video sampling from a trained Wan run: ``openspeed generate``.

Flow-matching Euler sampling with diffusers' ``FlowMatchEulerDiscreteScheduler`` (sigmas from 1 to 0,
shifted by ``shift``): the latent starts as Gaussian noise and moves along the predicted velocity,
``x <- x + (sigma_next - sigma) v``. With classifier-free guidance the DiT also predicts the velocity
for the empty caption and ``v = v_uncond + guidance * (v_cond - v_uncond)``. The latent is decoded by
the pipeline's VAE (or is the video, in pixel space) and written as an MP4 (GIF where PyAV has no
encoder) with a PNG contact sheet of its frames.

Each prompt's starting noise is drawn from its own generator (``seed + prompt number``, on the CPU), so
a clip does not depend on how prompts are batched, nor its noise on the device.

One process samples on ``device`` (``openspeed generate --device``; default this machine's
accelerator, the CPU when it has none): the DiT and the frozen encoders are loaded there, the
captions' embeddings, the noise and the image conditions are moved there, and the decoded clips
come back to the CPU to be written.

Distributed sampling: launched as several processes (``openspeed generate --nproc N``, or under
``torchrun``: ``WORLD_SIZE`` > 1), every rank loads the model and the frozen parts, draws the same
noise and encodes the same prompts, and the DiT runs Ulysses context parallelism over the video
tokens across all ranks (``models/wan/parallelize.py: apply_context_parallel``); every rank ends with
the same latents (equal to one process up to float rounding) and rank 0 writes the clips.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openspeed.config import RunConfig
from openspeed.errors import CheckpointError, ConfigError
from openspeed.models.wan.config import MODEL_NAME

# Clips smaller than this (longer side, pixels) are enlarged (nearest) in the MP4 and contact sheet.
VIEW_SIZE = 128


@dataclass
class TrainedDiT:
    """A trained run's DiT (fp32, eval mode) with its run config and where its weights came from."""

    model: nn.Module
    config: Any
    run_config: RunConfig
    run_dir: str
    checkpoint: str | None
    step: int
    ema: bool
    adapted: list[str]
    cp: Any = None
    """The :class:`ContextParallel` group the DiT's video tokens are split over (distributed sampling)."""


def enable_context_parallel(trained: TrainedDiT, cp) -> TrainedDiT:
    """Split the DiT's video tokens over ``cp`` (call on every rank of the group); returns ``trained``."""
    from openspeed.models.wan.parallelize import apply_context_parallel

    apply_context_parallel(trained.model, cp)
    trained.cp = cp
    return trained


def load_trained_dit(run_dir_or_checkpoint: str, device: torch.device | str = "cpu",
                     ema: bool | None = None) -> TrainedDiT:
    """A Wan run's DiT (with its LoRA adapters) from its latest (or the given) checkpoint.

    ``ema``: use the EMA weights (``None``: when the checkpoint has them). Without any checkpoint the
    pipeline's transformer weights are used. Raises :class:`CheckpointError` naming the path.
    """
    from openspeed.lora import lora_modules
    from openspeed.training.ema import ema_keys, load_ema_weights
    from openspeed.training.run_loading import load_trained

    trained = load_trained(run_dir_or_checkpoint, device)
    if trained.run_config.family != MODEL_NAME:
        raise CheckpointError(f"{trained.run_dir} is not a wan run (model.path {trained.run_config.model.path})")
    used_ema = False
    if trained.checkpoint is not None:
        has_ema = bool(ema_keys(trained.checkpoint))
        if ema and not has_ema:
            raise CheckpointError(f"checkpoint {trained.checkpoint} has no EMA weights (train.ema_decay was not set)")
        if has_ema and ema is not False:
            load_ema_weights(trained.model, trained.checkpoint)
            used_ema = True
    elif ema:
        raise CheckpointError(f"run {trained.run_dir} has no checkpoint, so no EMA weights")
    adapted = list(lora_modules(trained.model))
    return TrainedDiT(trained.model, trained.config, trained.run_config, trained.run_dir, trained.checkpoint,
                      trained.step, used_ema, adapted)


def velocity(model: nn.Module, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
             null_text: torch.Tensor | None, guidance: float, condition: torch.Tensor | None = None,
             image: torch.Tensor | None = None) -> torch.Tensor:
    """The (guided) velocity for a batch of latents; ``null_text`` ``None`` or ``guidance == 1``: no guidance."""
    x = latent if condition is None else torch.cat((latent, condition), dim=1)
    guided = null_text is not None and guidance != 1.0
    if guided:
        x = torch.cat((x, x))
        text = torch.cat((text, null_text.expand_as(text)))
        timestep = torch.cat((timestep, timestep))
        image = None if image is None else torch.cat((image, image))
    kwargs = {} if image is None else {"encoder_hidden_states_image": image}
    v = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, **kwargs).sample.float()
    if guided:
        v_cond, v_uncond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
    return v


@torch.no_grad()
def sample_latents(model: nn.Module, text: torch.Tensor, null_text: torch.Tensor | None, noise: torch.Tensor,
                   steps: int, guidance: float, shift: float, condition: torch.Tensor | None = None,
                   image: torch.Tensor | None = None) -> torch.Tensor:
    """Euler-integrate the flow from ``noise`` (sigma 1) to a clean latent (sigma 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        timestep = t.expand(x.shape[0]).to(torch.float32)
        v = velocity(model, x, timestep, text, null_text, guidance, condition, image)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def default_shape(run_cfg: RunConfig) -> tuple[int, int, int]:
    """(frames, height, width) of the run's first bucket."""
    from openspeed.data.video_text import parse_buckets

    return parse_buckets(run_cfg.wan.video_buckets, "wan.video_buckets")[0]


@torch.no_grad()
def generate_videos(
    trained: TrainedDiT,
    prompts: Sequence[str],
    *,
    images: Sequence[Any] | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 30,
    guidance: float = 5.0,
    shift: float | None = None,
    seed: int = 0,
    negative_prompt: str = "",
    batch_size: int = 8,
    parts=None,
) -> torch.Tensor:
    """Sample one clip per prompt: (n, 3, frames, height, width) in [-1, 1].

    ``images`` (PIL, one per prompt) are the first frames of image-to-video models. ``shift``
    defaults to the run's ``train.flow_shift``; the shape to the run's first bucket.
    """
    from openspeed.data.video_text import image_to_tensor
    from openspeed.models.wan.pipeline_io import load_frozen_parts

    run_cfg = trained.run_config
    f0, h0, w0 = default_shape(run_cfg)
    frames, height, width = frames or f0, height or h0, width or w0
    shift = run_cfg.wan.flow_shift if shift is None else shift
    if steps < 1:
        raise ConfigError(f"--steps: must be at least 1, got {steps}")
    device = next(trained.model.parameters()).device
    image_to_video = trained.config.image_dim is not None
    if image_to_video and (images is None or len(images) != len(prompts)):
        raise ConfigError("this is an image-to-video model: give --image (the first frame)")
    if parts is None:
        parts = load_frozen_parts(run_cfg.model.path, vae=run_cfg.wan.vae, text_len=run_cfg.wan.text_len,
                                  image_to_video=image_to_video, device=device)
    parts.check_video_shape(frames, height, width)
    latent_shape = parts.latent_shape(frames, height, width)
    if trained.cp is not None:
        tokens = math.prod(latent_shape[1:]) // trained.config.patch_volume
        if tokens % trained.cp.seq_multiple:
            raise ConfigError(
                f"--nproc {trained.cp.size}: a {frames}x{height}x{width} clip has {tokens} video tokens, "
                f"not a multiple of {trained.cp.seq_multiple} (change --frames / --height / --width or --nproc)"
            )
    null = parts.encode_caption(negative_prompt)[None].to(device)
    videos = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        text = parts.encode_captions(chunk).to(device)
        noise = torch.stack([
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + start + i))
            for i in range(len(chunk))
        ]).to(device)
        condition = image = None
        if image_to_video:
            pil = list(images[start : start + len(chunk)])
            image = parts.encode_image(pil).to(device)
            first = torch.stack([image_to_tensor(p, height, width) for p in pil])
            condition = parts.image_condition(first, frames).to(device)
        latent = sample_latents(trained.model, text, null, noise, steps, guidance, shift, condition, image)
        videos.append(parts.decode_latent(latent).cpu())
    return torch.cat(videos)


def _enlarge(frames, scale: int):
    import numpy as np

    if scale == 1:
        return frames
    return np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)


def save_clip(video: torch.Tensor, out: str | Path, fps: int = 8) -> dict[str, str]:
    """Write one (3, F, H, W) clip as ``out`` (MP4, or GIF without an encoder) plus ``<stem>.png``."""
    from openspeed.data.video_text import video_to_uint8, write_contact_sheet, write_video

    out = Path(out)
    frames = video_to_uint8(video)
    scale = max(1, math.ceil(VIEW_SIZE / max(frames.shape[1:3])))
    written = write_video(out, _enlarge(frames, scale), fps=fps)
    sheet = write_contact_sheet(out.with_suffix(".png"), frames, scale=max(1, scale // 2))
    return {"video": str(written), "frames": str(sheet)}


def run_generate(
    checkpoint: str,
    prompts: Sequence[str],
    out: str,
    *,
    image_paths: Sequence[str] = (),
    score: bool = False,
    ema: bool | None = None,
    device: torch.device | str | None = "auto",
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """``openspeed generate``: sample, write the clips (and score them); returns a summary.

    ``device``: where one process samples (see :func:`sampling_device`).

    One prompt writes ``out`` (``.mp4``) and ``<out stem>.png``; several write ``clip_NNN.mp4`` / ``.png``
    and ``samples.jsonl`` into the directory ``out``. ``score`` checks each clip's colour and motion
    against its caption with the moving-shapes checker.

    Run as several processes (``WORLD_SIZE`` > 1: ``openspeed generate --nproc N`` or ``torchrun``) the
    DiT runs Ulysses over the video tokens across them (see the module docstring); rank 0 writes and
    scores, the other ranks return a summary without clips.
    """
    import torch.distributed as dist

    from openspeed.accelerator import init_distributed
    from openspeed.data.video_text import load_image
    from openspeed.distributed.comm import destroy_distributed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = sampling_device(device, world_size)
    images = None
    if image_paths:
        loaded = [load_image(p) for p in image_paths]
        images = loaded * len(prompts) if len(loaded) == 1 else loaded
        if len(images) != len(prompts):
            raise ConfigError(f"--image: give one image, or one per prompt ({len(prompts)})")
    if world_size <= 1:
        trained = load_trained_dit(checkpoint, device, ema=ema)
        videos = generate_videos(trained, prompts, images=images, **sample_kwargs)
        return _write_outputs(trained, prompts, videos, out, score)

    # Several processes: Ulysses over the video tokens across all of them; rank 0 writes.
    from openspeed.distributed.context_parallel import ContextParallel

    owns_group = not dist.is_initialized()  # a caller's process group is left to the caller
    rank, _ = init_distributed()
    try:
        trained = load_trained_dit(checkpoint, device, ema=ema)
        enable_context_parallel(trained, ContextParallel.from_group(dist.group.WORLD, "ulysses"))
        videos = generate_videos(trained, prompts, images=images, **sample_kwargs)
        if rank == 0:
            return _write_outputs(trained, prompts, videos, out, score)
        return {"step": trained.step, "ema": trained.ema, "clips": []}
    finally:
        if owns_group:
            destroy_distributed()


def sampling_device(name: torch.device | str | None, world_size: int = 1) -> torch.device:
    """The device ``openspeed generate --device NAME`` samples on; a :class:`ConfigError` line for one
    this machine lacks.

    One process: :func:`openspeed.accelerator.resolve_device` (``auto``: the accelerator, the CPU when
    there is none). Several processes each take their local rank's device of the accelerator the
    process group runs on, so ``NAME`` may only be ``auto`` or that device type
    (``OPENSPEED_DEVICE=cpu`` runs them on the CPU).
    """
    from openspeed.accelerator import DEVICE_ENV, get_accelerator, resolve_device

    device = resolve_device(None if name is None else str(name))
    if world_size <= 1:
        return device
    kind = get_accelerator().device_type
    asked = "auto" if name is None else str(name).strip().lower()
    if asked not in ("", "auto", kind):
        raise ConfigError(f"--device {name}: {world_size} processes each use their own {kind} device "
                          f"(give --device {kind} or auto; {DEVICE_ENV}=cpu runs them on the CPU)")
    return get_accelerator().device


def _write_outputs(trained: TrainedDiT, prompts: Sequence[str], videos: torch.Tensor, out: str,
                   score: bool) -> dict[str, Any]:
    """Write the clips (and score them); the summary :func:`run_generate` returns."""
    from openspeed.data.video_text import video_to_uint8

    videos = videos.cpu()
    single = len(prompts) == 1 and not os.path.isdir(out) and Path(out).suffix
    records = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        path = Path(out) if single else Path(out) / f"clip_{i:03d}.mp4"
        record: dict[str, Any] = {"prompt": prompt, **save_clip(video, path)}
        if score:
            from openspeed.models.wan.moving_shapes import score_clip

            record.update(score_clip(video_to_uint8(video), prompt))
        records.append(record)
    summary: dict[str, Any] = {"step": trained.step, "ema": trained.ema, "clips": records}
    if score:
        from openspeed.models.wan.moving_shapes import summarise_scores

        summary["scores"] = summarise_scores(records)
    if not single:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "samples.jsonl", "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        if score:
            (Path(out) / "scores.json").write_text(json.dumps(summary["scores"], indent=2) + "\n", encoding="utf-8")
    return summary


__all__ = ["TrainedDiT", "enable_context_parallel", "generate_videos", "load_trained_dit", "run_generate",
           "sample_latents", "sampling_device", "save_clip", "velocity"]
