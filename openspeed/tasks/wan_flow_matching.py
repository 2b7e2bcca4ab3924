"""Wan2.1 flow-matching objective: video (+ caption, + first frame) in, velocity regression out.

As Wan trains: a clip's normalised VAE latent ``x0`` and Gaussian noise ``n`` are mixed at a noise
level ``sigma`` in [0, 1], ``x_t = (1 - sigma) x0 + sigma n``, and the DiT, given ``x_t``, the timestep
``1000 sigma`` and the caption (and for I2V the first-frame condition and CLIP tokens), predicts the
velocity ``n - x0``; the loss is the mean squared error. ``sigma`` is ``u`` (uniform, or logit-normal)
pushed through the timestep shift ``s u / (1 + (s - 1) u)`` (``train.flow_shift``), which spends more
training on the noisy end, as sampling with the same shift does. With probability
``data.caption_dropout`` a sample is trained on the empty caption instead, which is what
classifier-free guidance contrasts against at sampling time.

Every random draw of a sample (caption dropout, ``u``, the noise) comes from a generator seeded by
(``train.seed``, step, sample index), so any data-parallel layout, and training from extracted features,
sees exactly the same draws. A micro-batch's loss is the sum of its samples' mean squared errors
divided by the step's global sample count, so gradients summed over micro-batches and ranks are
those of the global mean.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from openspeed.config import RunConfig
from openspeed.errors import BadSampleError, ConfigError, DataError
from openspeed.tasks.samples import usable_samples

NUM_TRAIN_TIMESTEPS = 1000


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of one sample's draws at one step (independent of rank and layout)."""
    key = zlib.crc32(f"{seed}:{step}:{index}".encode())
    return torch.Generator(device="cpu").manual_seed(key * 1_000_003 + index)


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of flow matching: ``shift * u / (1 + (shift - 1) * u)``."""
    return shift * u / (1 + (shift - 1) * u)


class WanFlowMatchingTask:
    """Owns the frozen encoders and the data set; turns sample indices into the flow-matching loss.

    Args:
        cfg: the run config (``model.path`` a Wan pipeline, ``data.*`` the video keys).
        device: where the frozen encoders run.
        model_config: the DiT's :class:`~openspeed.models.wan.WanConfig` (read from the pipeline if
            ``None``), used to check channel counts and pick image-to-video.
    """

    def __init__(self, cfg: RunConfig, device: torch.device | None = None, model_config=None) -> None:
        from openspeed.data.features import FeatureDataset, is_features_index
        from openspeed.data.video_text import VideoTextDataset, parse_buckets
        from openspeed.data.wan_pipeline import load_frozen_parts

        self.cfg = cfg
        self.device = device or torch.device("cpu")
        if model_config is None:
            from openspeed.training.model_setup import model_config_from_run

            _, model_config = model_config_from_run(cfg)
        self.model_config = model_config
        self.image_to_video = model_config.image_dim is not None
        self.patch = model_config.patch_size
        self.skipped: dict[int, str] = {}
        self._fallback: dict[str, Any] | None = None
        self.parts = None
        self._null_text: torch.Tensor | None = None

        if is_features_index(cfg.data.train_path):
            self.train_set: Any = FeatureDataset(cfg.data.train_path)
            meta = self.train_set.meta
            if meta.get("text_len") != cfg.data.text_len:
                raise ConfigError(
                    f"data.text_len={cfg.data.text_len} but the features in {cfg.data.train_path} were "
                    f"extracted with {meta.get('text_len')}"
                )
            if meta.get("vae") != cfg.model.vae:
                raise ConfigError(
                    f"model.vae={cfg.model.vae} but the features in {cfg.data.train_path} were extracted "
                    f"with {meta.get('vae')}"
                )
            if bool(meta.get("image_to_video")) != self.image_to_video:
                raise ConfigError("the extracted features and the model disagree on image-to-video")
            self._null_text = self.train_set.null_text
        else:
            self.parts = load_frozen_parts(cfg.model.path, vae=cfg.model.vae, text_len=cfg.data.text_len,
                                           image_to_video=self.image_to_video, device=self.device)
            buckets = parse_buckets(cfg.data.video_buckets)
            for bucket in buckets:
                self.parts.check_video_shape(*bucket)
                _, f, h, w = self.parts.latent_shape(*bucket)
                if f % self.patch[0] or h % self.patch[1] or w % self.patch[2]:
                    raise ConfigError(
                        f"data.video_buckets: the latent {f}x{h}x{w} of {'x'.join(map(str, bucket))} is "
                        f"not a multiple of the DiT's patch_size {self.patch}"
                    )
            self._check_channels(self.parts.z_dim, self.parts.temporal_factor)
            self.train_set = VideoTextDataset(cfg.data.train_path, buckets, cfg.data.frame_interval,
                                              image_to_video=self.image_to_video)
        if len(self.train_set) == 0:
            raise DataError(f"data.train_path: no records in {cfg.data.train_path}")
        if self.image_to_video and cfg.data.text_len != 512:
            raise ConfigError(
                f"data.text_len={cfg.data.text_len}: image-to-video needs 512 (the DiT takes the last 512 "
                "context tokens as text)"
            )

    def _check_channels(self, z_dim: int, mask_channels: int) -> None:
        cfg = self.model_config
        want = 2 * z_dim + mask_channels if self.image_to_video else z_dim
        if cfg.in_channels != want or cfg.out_channels != z_dim:
            what = "pixel space" if self.parts is not None and self.parts.is_identity else "the VAE"
            raise ConfigError(
                f"model.path: the DiT takes {cfg.in_channels} channels in and {cfg.out_channels} out, but "
                f"{what} needs {want} in and {z_dim} out (model.vae={self.cfg.model.vae})"
            )

    # ------------------------------------------------------------------ samples

    def null_text(self) -> torch.Tensor:
        """Embedding of the empty caption (caption dropout, the unconditional branch of guidance)."""
        if self._null_text is None:
            self._null_text = self.parts.encode_caption("")
        return self._null_text

    @torch.no_grad()
    def encode_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """A raw sample (video, caption[, first_frame]) -> latent, text (and image, condition) tensors.

        Feature samples are returned as they are.
        """
        if "latent" in sample:
            return sample
        from openspeed.data.video_text import image_to_tensor

        video = sample["video"]
        out = {"index": sample["index"], "caption": sample["caption"], "weight": sample.get("weight", 1.0)}
        out["latent"] = self.parts.encode_video(video[None])[0].cpu()
        out["text"] = self.parts.encode_caption(sample["caption"])
        if self.image_to_video:
            _, frames, height, width = video.shape
            first = sample["first_frame"]
            out["image"] = self.parts.encode_image([first])[0].cpu()
            frame = image_to_tensor(first, height, width)
            out["condition"] = self.parts.image_condition(frame[None], frames)[0].cpu()
        return out

    def _weightless_fallback(self, dataset) -> dict[str, Any]:
        """A real sample with weight 0: keeps all ranks in lock-step, adds nothing to the loss."""
        if self._fallback is None:
            for index in range(len(dataset)):
                try:
                    self._fallback = dict(dataset[index])
                    break
                except BadSampleError:
                    continue
            else:
                raise DataError("no usable sample in the data set: every record was skipped")
        return {**self._fallback, "weight": 0.0}

    def load_batch(self, dataset, indices: list[int], skips: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """The usable samples among ``indices`` (decoded, not yet encoded); bad ones are noted in ``skips``."""
        samples = usable_samples(dataset, indices, skips)
        return samples or [self._weightless_fallback(dataset)]

    @staticmethod
    def count_samples(batch: list[dict[str, Any]]) -> int:
        """Samples that count towards the loss (weight 1)."""
        return sum(1 for s in batch if s.get("weight", 1.0) > 0)

    def count_tokens(self, encoded: list[dict[str, Any]]) -> int:
        """Video tokens the DiT sees for these samples."""
        total = 0
        for s in encoded:
            _, f, h, w = s["latent"].shape
            total += (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])
        return total

    def group(self, encoded: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Samples that can share one forward (same latent, text and image shapes), in order."""
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for s in encoded:
            image = s.get("image")
            key = (tuple(s["latent"].shape), tuple(s["text"].shape), None if image is None else tuple(image.shape))
            groups.setdefault(key, []).append(s)
        return list(groups.values())

    # ------------------------------------------------------------------ the objective

    def draws(self, sample: dict[str, Any], step: int) -> tuple[bool, float, torch.Tensor]:
        """(drop the caption, sigma, noise) of one sample at one step."""
        gen = sample_generator(self.cfg.train.seed, step, int(sample["index"]))
        drop = bool(torch.rand((), generator=gen) < self.cfg.data.caption_dropout)
        if self.cfg.train.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn((), generator=gen, dtype=torch.float64))
        else:
            u = torch.rand((), generator=gen, dtype=torch.float64)
        sigma = float(shift_sigma(u, self.cfg.train.flow_shift))
        noise = torch.randn(sample["latent"].shape, generator=gen)
        return drop, sigma, noise

    def group_loss(self, model: nn.Module, group: list[dict[str, Any]], step: int, num_samples: int,
                   scale: float = 1.0) -> torch.Tensor:
        """``scale * sum(weight * per-sample MSE) / num_samples`` over one forward of ``group``."""
        device = next(model.parameters()).device
        x0, noise, sigma, text, weights = [], [], [], [], []
        for s in group:
            drop, sig, n = self.draws(s, step)
            x0.append(s["latent"])
            noise.append(n)
            sigma.append(sig)
            text.append(self.null_text() if drop else s["text"])
            weights.append(float(s.get("weight", 1.0)))
        x0 = torch.stack(x0).to(device, torch.float32)
        noise = torch.stack(noise).to(device, torch.float32)
        sigma_t = torch.tensor(sigma, dtype=torch.float32, device=device)
        s5 = sigma_t.view(-1, 1, 1, 1, 1)
        x_t = (1 - s5) * x0 + s5 * noise
        inputs: dict[str, Any] = {
            "timestep": sigma_t * NUM_TRAIN_TIMESTEPS,
            "encoder_hidden_states": torch.stack(text).to(device, torch.float32),
        }
        if self.image_to_video:
            condition = torch.stack([s["condition"] for s in group]).to(device, torch.float32)
            x_t = torch.cat((x_t, condition), dim=1)
            inputs["encoder_hidden_states_image"] = torch.stack([s["image"] for s in group]).to(device, torch.float32)
        pred = model(hidden_states=x_t, **inputs).sample
        mse = (pred.float() - (noise - x0)).square().flatten(1).mean(dim=1)
        weight = torch.tensor(weights, dtype=torch.float32, device=device)
        return (mse * weight).sum() * (scale / max(1, num_samples))

    def loss(self, model: nn.Module, encoded: list[dict[str, Any]], step: int, num_samples: int) -> torch.Tensor:
        """The micro-batch's loss (all its groups), for single-process use and tests."""
        return sum(self.group_loss(model, g, step, num_samples) for g in self.group(encoded))


__all__ = ["NUM_TRAIN_TIMESTEPS", "WanFlowMatchingTask", "sample_generator", "shift_sigma"]
