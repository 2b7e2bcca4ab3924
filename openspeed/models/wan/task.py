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

    For the training loop (:mod:`openspeed.tasks.base`): a micro-batch is a list of decoded samples;
    its forwards are its samples encoded (frozen VAE / text encoder, in the training thread) and
    grouped by shape; the loss is normalised by the step's global sample count. Context-parallel
    ranks each see the whole gathered output, so each computes the whole loss. Validation
    (``data.val_path``): the mean squared error at the fixed noise levels ``wan.val_sigmas``, with
    noise fixed per (``train.seed``, sample, level) and no caption dropout, so every validation of
    a run (and of any layout) measures the same thing.

    Args:
        cfg: the run config (``model.path`` a Wan pipeline, ``data.*`` the video keys).
        device: where the frozen encoders run.
        model_config: the DiT's :class:`~openspeed.models.wan.WanConfig` (read from the pipeline if
            ``None``), used to check channel counts and pick image-to-video.
    """

    count_name = "samples"
    cp_splits_loss = False
    uneven_forwards = True

    def __init__(self, cfg: RunConfig, device: torch.device | None = None, model_config=None, spec=None) -> None:
        from openspeed.data.video_text import VideoTextDataset, parse_buckets
        from openspeed.models.wan.features import FeatureDataset, is_features_index
        from openspeed.models.wan.pipeline_io import load_frozen_parts

        self.cfg = cfg
        self.device = device or torch.device("cpu")
        if model_config is None:
            from openspeed.models.loading import model_config_from_run

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
            if meta.get("text_len") != cfg.wan.text_len:
                raise ConfigError(
                    f"wan.text_len={cfg.wan.text_len} but the features in {cfg.data.train_path} were "
                    f"extracted with {meta.get('text_len')}"
                )
            if meta.get("vae") != cfg.wan.vae:
                raise ConfigError(
                    f"wan.vae={cfg.wan.vae} but the features in {cfg.data.train_path} were extracted "
                    f"with {meta.get('vae')}"
                )
            if bool(meta.get("image_to_video")) != self.image_to_video:
                raise ConfigError("the extracted features and the model disagree on image-to-video")
            self._null_text = self.train_set.null_text
        else:
            self.parts = load_frozen_parts(cfg.model.path, vae=cfg.wan.vae, text_len=cfg.wan.text_len,
                                           image_to_video=self.image_to_video, device=self.device)
            buckets = parse_buckets(cfg.wan.video_buckets, "wan.video_buckets")
            for bucket in buckets:
                self.parts.check_video_shape(*bucket)
                _, f, h, w = self.parts.latent_shape(*bucket)
                if f % self.patch[0] or h % self.patch[1] or w % self.patch[2]:
                    raise ConfigError(
                        f"wan.video_buckets: the latent {f}x{h}x{w} of {'x'.join(map(str, bucket))} is "
                        f"not a multiple of the DiT's patch_size {self.patch}"
                    )
            self._check_channels(self.parts.z_dim, self.parts.temporal_factor)
            self.train_set = VideoTextDataset(cfg.data.train_path, buckets, cfg.wan.frame_interval,
                                              image_to_video=self.image_to_video)
        if len(self.train_set) == 0:
            raise DataError(f"data.train_path: no records in {cfg.data.train_path}")
        self.val_set: Any = None
        if cfg.data.val_path:
            if is_features_index(cfg.data.val_path):
                self.val_set = FeatureDataset(cfg.data.val_path)
                if self.parts is None and self.val_set.meta.get("text_len") != cfg.wan.text_len:
                    raise ConfigError(f"wan.text_len={cfg.wan.text_len} but the features in {cfg.data.val_path} "
                                      f"were extracted with {self.val_set.meta.get('text_len')}")
            elif self.parts is None:
                raise ConfigError("data.val_path: training reads extracted features, so validation must too "
                                  "(extract the validation clips with openspeed data extract-features)")
            else:
                self.val_set = VideoTextDataset(cfg.data.val_path, buckets, cfg.wan.frame_interval,
                                                image_to_video=self.image_to_video)
            if len(self.val_set) == 0:
                raise DataError(f"data.val_path: no records in {cfg.data.val_path}")
        if self.image_to_video and cfg.wan.text_len != 512:
            raise ConfigError(
                f"wan.text_len={cfg.wan.text_len}: image-to-video needs 512 (the DiT takes the last 512 "
                "context tokens as text)"
            )

    def _check_channels(self, z_dim: int, mask_channels: int) -> None:
        cfg = self.model_config
        want = 2 * z_dim + mask_channels if self.image_to_video else z_dim
        if cfg.in_channels != want or cfg.out_channels != z_dim:
            what = "pixel space" if self.parts is not None and self.parts.is_identity else "the VAE"
            raise ConfigError(
                f"model.path: the DiT takes {cfg.in_channels} channels in and {cfg.out_channels} out, but "
                f"{what} needs {want} in and {z_dim} out (wan.vae={self.cfg.wan.vae})"
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

    count_targets = count_samples

    def _latent_dims(self, sample: dict[str, Any]) -> tuple[int, int, int]:
        if "latent" in sample:
            return tuple(sample["latent"].shape[1:])
        _, frames, height, width = sample["video"].shape
        return tuple(self.parts.latent_shape(frames, height, width)[1:])

    def count_tokens(self, samples: list[dict[str, Any]]) -> int:
        """Video tokens the DiT sees for these samples (decoded or encoded)."""
        total = 0
        for s in samples:
            f, h, w = self._latent_dims(s)
            total += (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])
        return total

    def annotate(self, batch: list[dict[str, Any]]) -> None:
        """Nothing to cache: the FLOPs are counted from the encoded shapes."""

    def configure_context_parallel(self, cp) -> None:
        """The DiT's plan splits the video tokens itself; batches need no padding."""

    def forwards(self, batch: list[dict[str, Any]], step: int) -> list[list[dict[str, Any]]]:
        """The micro-batch's samples encoded and grouped by shape: one forward per group."""
        return self.group([self.encode_sample(s) for s in batch])

    def flops(self, group: list[dict[str, Any]]) -> float:
        """Training FLOPs of one forward of ``group`` (:func:`openspeed.models.wan.flops.training_flops`)."""
        from openspeed.models.wan.flops import training_flops

        first = group[0]
        image_tokens = int(first["image"].shape[-2]) if first.get("image") is not None else 0
        return float(training_flops(self.model_config, int(first["text"].shape[-2]),
                                    [self._latent_dims(s) for s in group], image_tokens))

    def loss(self, model: nn.Module, group: list[dict[str, Any]], num_items: int, step: int) -> torch.Tensor:
        return self.group_loss(model, group, step, num_items)

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
        drop = bool(torch.rand((), generator=gen) < self.cfg.wan.caption_dropout)
        if self.cfg.wan.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn((), generator=gen, dtype=torch.float64))
        else:
            u = torch.rand((), generator=gen, dtype=torch.float64)
        sigma = float(shift_sigma(u, self.cfg.wan.flow_shift))
        noise = torch.randn(sample["latent"].shape, generator=gen)
        return drop, sigma, noise

    def _weighted_mse(self, model: nn.Module, group: list[dict[str, Any]], sigma: list[float],
                      noise: list[torch.Tensor], text: list[torch.Tensor]) -> torch.Tensor:
        """``sum(weight * per-sample MSE)`` of one forward of ``group`` at the given draws."""
        device = next(model.parameters()).device
        x0 = torch.stack([s["latent"] for s in group]).to(device, torch.float32)
        noise_t = torch.stack(noise).to(device, torch.float32)
        sigma_t = torch.tensor(sigma, dtype=torch.float32, device=device)
        s5 = sigma_t.view(-1, 1, 1, 1, 1)
        x_t = (1 - s5) * x0 + s5 * noise_t
        inputs: dict[str, Any] = {
            "timestep": sigma_t * NUM_TRAIN_TIMESTEPS,
            "encoder_hidden_states": torch.stack(text).to(device, torch.float32),
        }
        if self.image_to_video:
            condition = torch.stack([s["condition"] for s in group]).to(device, torch.float32)
            x_t = torch.cat((x_t, condition), dim=1)
            inputs["encoder_hidden_states_image"] = torch.stack([s["image"] for s in group]).to(device, torch.float32)
        pred = model(hidden_states=x_t, **inputs).sample
        mse = (pred.float() - (noise_t - x0)).square().flatten(1).mean(dim=1)
        weight = torch.tensor([float(s.get("weight", 1.0)) for s in group], dtype=torch.float32, device=device)
        return (mse * weight).sum()

    def group_loss(self, model: nn.Module, group: list[dict[str, Any]], step: int, num_samples: int,
                   scale: float = 1.0) -> torch.Tensor:
        """``scale * sum(weight * per-sample MSE) / num_samples`` over one forward of ``group``."""
        draws = [self.draws(s, step) for s in group]
        text = [self.null_text() if drop else s["text"] for s, (drop, _, _) in zip(group, draws)]
        total = self._weighted_mse(model, group, [d[1] for d in draws], [d[2] for d in draws], text)
        return total * (scale / max(1, num_samples))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx) -> dict[str, Any]:
        """Validation loss at the fixed noise levels ``wan.val_sigmas`` (see the class docstring).

        Every rank runs as many forwards as the rank with the most (FSDP gathers in each); the sums
        are reduced over the data-parallel group. Returns ``val_loss`` (the mean over samples and
        levels), ``val_loss_sigma`` (per level) and ``val_samples``.
        """
        from openspeed.distributed import comm

        cfg = self.cfg
        n = len(self.val_set)
        if cfg.train.eval_max_samples is not None:
            n = min(n, cfg.train.eval_max_samples)
        sigmas = [float(s) for s in cfg.wan.val_sigmas]
        mine = list(range(n))[ctx.dp_rank::ctx.dp_size]
        mbs = cfg.train.micro_batch_size
        forwards = []
        for start in range(0, len(mine), mbs):
            samples = self.load_batch(self.val_set, mine[start:start + mbs])
            forwards += [(g, k) for g in self.group([self.encode_sample(s) for s in samples])
                         for k in range(len(sigmas))]
        (most,) = comm.max_counts([len(forwards)], group=ctx.dp_group)
        if not forwards:  # fewer validation samples than ranks: run weightless copies
            forwards = [([self.encode_sample(self._weightless_fallback(self.val_set))], 0)]
        padding = [([{**s, "weight": 0.0} for s in forwards[0][0]], forwards[0][1])]
        forwards += padding * (most - len(forwards))
        was_training = model.training
        model.eval()
        sums = torch.zeros(2 * len(sigmas), dtype=torch.float32, device=comm.comm_device())
        for group, k in forwards:
            noise = [torch.randn(s["latent"].shape, generator=sample_generator(cfg.train.seed, -1 - k, int(s["index"])))
                     for s in group]
            with ctx.acc.autocast(cfg.train.precision):
                total = self._weighted_mse(model, group, [sigmas[k]] * len(group), noise, [s["text"] for s in group])
            sums[k] += total.detach().float().to(sums.device)
            sums[len(sigmas) + k] += sum(float(s.get("weight", 1.0)) for s in group)
        if was_training:
            model.train()
        sums = comm.all_reduce(sums, group=ctx.dp_group).cpu().double()
        losses, counts = sums[: len(sigmas)], sums[len(sigmas):]
        per_sigma = {f"{s:g}": float(losses[k] / max(1.0, float(counts[k]))) for k, s in enumerate(sigmas)}
        return {"val_loss": float(losses.sum() / max(1.0, float(counts.sum()))), "val_loss_sigma": per_sigma,
                "val_samples": int(counts[0])}

    def final_report(self, model: nn.Module, ctx, final_eval: dict[str, Any]) -> dict[str, Any]:
        """Nothing beyond the final validation."""
        return {"metrics": {}, "summary": {}, "lines": []}

    def batch_loss(self, model: nn.Module, encoded: list[dict[str, Any]], step: int, num_samples: int) -> torch.Tensor:
        """The micro-batch's loss (all its groups), for single-process use and tests."""
        return sum(self.group_loss(model, g, step, num_samples) for g in self.group(encoded))


__all__ = ["NUM_TRAIN_TIMESTEPS", "WanFlowMatchingTask", "sample_generator", "shift_sigma"]
