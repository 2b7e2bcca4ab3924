"""Wan2.1 pipeline directories: the frozen parts (VAE, UMT5 text encoder, CLIP image encoder) and a
tiny random pipeline for tests and the demo.

A diffusers-format Wan pipeline directory holds ``model_index.json`` and one folder per part::

    transformer/     WanTransformer3DModel config + weights (trained natively, see openspeed.models.wan)
    vae/             AutoencoderKLWan
    text_encoder/    transformers UMT5EncoderModel
    tokenizer/       its tokenizer
    scheduler/       FlowMatchEulerDiscreteScheduler config
    image_encoder/   CLIPVisionModel   (image-to-video only)
    image_processor/ CLIPImageProcessor              (image-to-video only)

The frozen parts are the diffusers / transformers modules themselves, loaded as they are and used
under ``torch.no_grad``. :class:`WanFrozenParts` wraps them with the encodings Wan's pipelines use:
captions as UMT5 states of the real tokens followed by zeros up to ``text_len``; videos in [-1, 1]
through the VAE, the latent being the distribution's mode, normalised per channel with the VAE's
``latents_mean`` / ``latents_std``; the I2V condition as [first-frame mask; latent of the first frame
followed by black frames]; CLIP image tokens from the penultimate hidden layer.

``vae="identity"`` replaces the VAE by :class:`IdentityVAE` (latents are the pixels in [-1, 1]): the
pixel-space mode of the CPU demo.

``write_tiny_wan_pipeline`` writes a complete tiny random pipeline (with a tokenizer trained offline by
the ``tokenizers`` library on a small word list), so nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openspeed.errors import CheckpointError, ConfigError

MODEL_INDEX = "model_index.json"
TRANSFORMER_DIR = "transformer"
DIFFUSERS_VERSION = "0.42.1"
# Words every tiny tokenizer knows: the moving-shapes captions plus common caption words.
BASE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "to", "is", "moves", "moving", "slowly", "quickly",
    "left", "right", "up", "down", "red", "green", "blue", "yellow", "magenta", "cyan", "white", "black",
    "orange", "purple", "square", "circle", "triangle", "ball", "box", "shape", "video", "scene", "camera",
    "cat", "dog", "person", "walks", "runs", "sky", "water", "tree", "car", "background", "bright", "dark",
    "small", "large", "one", "two", "frame", "static", "still",
)
# Bytes of caption embeddings kept in memory by the text cache (the encoder is frozen).
TEXT_CACHE_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------------
# Directory layout
# --------------------------------------------------------------------------------------------------


def pipeline_dirs(path: str | Path) -> tuple[Path, Path]:
    """``(pipeline root, transformer dir)`` for a pipeline root or the transformer folder inside one."""
    path = Path(path)
    if (path / MODEL_INDEX).is_file():
        return path, path / TRANSFORMER_DIR
    if (path.parent / MODEL_INDEX).is_file():
        return path.parent, path
    raise ConfigError(
        f"model.path: {path} is not a diffusers pipeline directory (no {MODEL_INDEX} in it or its parent)"
    )


def is_pipeline_dir(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline root (has ``model_index.json``)."""
    return (Path(path) / MODEL_INDEX).is_file()


# --------------------------------------------------------------------------------------------------
# The pixel-space "VAE"
# --------------------------------------------------------------------------------------------------


class IdentityVAE(nn.Module):
    """Pixel-space stand-in for the VAE: the latent of a video in [-1, 1] is the video itself.

    No compression (temporal and spatial factors 1, 3 latent channels); the DiT's patch embedding does
    all the patching. Used by the CPU demo (``model.vae: identity``).
    """

    z_dim = 3
    temporal_factor = 1
    spatial_factor = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(batch, 3, frames, height, width) in [-1, 1] -> the same tensor (the latent)."""
        return video

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent -> video in [-1, 1]."""
        return latent


# --------------------------------------------------------------------------------------------------
# Frozen parts
# --------------------------------------------------------------------------------------------------


@dataclass
class WanFrozenParts:
    """The frozen encoders of a Wan pipeline, with Wan's encodings of captions, videos and images.

    Attributes:
        vae: diffusers ``AutoencoderKLWan`` or :class:`IdentityVAE`.
        text_encoder / tokenizer: transformers UMT5 encoder and its tokenizer.
        text_len: captions are padded with zeros (truncated) to this many tokens.
        image_encoder / image_processor: CLIP vision model and processor (image-to-video), or ``None``.
        device: where the encoders run.
    """

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    text_len: int
    image_encoder: nn.Module | None = None
    image_processor: Any = None
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0

    # ------------------------------------------------------------------ shapes

    @property
    def is_identity(self) -> bool:
        return isinstance(self.vae, IdentityVAE)

    @property
    def z_dim(self) -> int:
        return self.vae.z_dim if self.is_identity else int(self.vae.config.z_dim)

    @property
    def temporal_factor(self) -> int:
        return self.vae.temporal_factor if self.is_identity else int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_factor(self) -> int:
        return self.vae.spatial_factor if self.is_identity else int(self.vae.config.scale_factor_spatial)

    def check_video_shape(self, frames: int, height: int, width: int) -> None:
        """``ConfigError`` unless the VAE can encode a (frames, height, width) clip."""
        t, s = self.temporal_factor, self.spatial_factor
        if (frames - 1) % t or height % s or width % s:
            raise ConfigError(
                f"wan.video_buckets: {frames}x{height}x{width} does not fit the VAE: frames must be "
                f"1 + {t}k and height, width multiples of {s}"
            )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent of a clip."""
        t, s = self.temporal_factor, self.spatial_factor
        return self.z_dim, (frames - 1) // t + 1, height // s, width // s

    # ------------------------------------------------------------------ encoders

    def _vae_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised latent (batch, z, f, h, w) of a (batch, 3, frames, H, W) video in [-1, 1].

        The VAE latent is the posterior's mode (deterministic), then ``(mode - mean) / std`` per channel.
        """
        video = video.to(self.device, torch.float32)
        if self.is_identity:
            return self.vae.encode(video)
        mode = self.vae.encode(video).latent_dist.mode()
        mean, std = self._vae_stats(mode)
        return (mode - mean) / std

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Video in [-1, 1] (batch, 3, frames, H, W) of a normalised latent."""
        latent = latent.to(self.device, torch.float32)
        if self.is_identity:
            return self.vae.decode(latent).clamp(-1, 1)
        mean, std = self._vae_stats(latent)
        return self.vae.decode(latent * std + mean).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode_caption(self, caption: str) -> torch.Tensor:
        """(text_len, text_dim) fp32 UMT5 states of the caption's tokens, zeros after them (on the CPU).

        Encoded one caption at a time (so a caption's embedding never depends on its batch) and cached.
        """
        cached = self._text_cache.get(caption)
        if cached is not None:
            self._text_cache.move_to_end(caption)
            return cached
        tokens = self.tokenizer(
            [caption], padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        states = self.text_encoder(ids, mask).last_hidden_state[0].float().cpu()
        length = int(mask.sum())
        out = torch.zeros_like(states)
        out[:length] = states[:length]
        self._text_cache[caption] = out
        self._cache_bytes += out.numel() * out.element_size()
        while self._cache_bytes > TEXT_CACHE_BYTES and len(self._text_cache) > 1:
            _, old = self._text_cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return out

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """(batch, text_len, text_dim) for a list of captions."""
        return torch.stack([self.encode_caption(c) for c in captions])

    @torch.no_grad()
    def encode_image(self, images: Sequence[Any]) -> torch.Tensor:
        """CLIP tokens (batch, tokens, image_dim) of PIL images: the penultimate hidden layer, as Wan."""
        if self.image_encoder is None:
            raise ConfigError("this pipeline has no image_encoder: image-to-video needs one")
        inputs = self.image_processor(images=list(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, torch.float32)
        out = self.image_encoder(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].float()

    @torch.no_grad()
    def image_condition(self, first_frame: torch.Tensor, frames: int) -> torch.Tensor:
        """Wan2.1 I2V condition (batch, temporal_factor + z, f, h, w) for a (batch, 3, H, W) first frame.

        The first ``temporal_factor`` channels are the mask (1 on the first latent frame, which the
        first video frame fills, 0 elsewhere); the rest are the normalised latent of the first frame
        followed by ``frames - 1`` black (zero) frames.
        """
        first_frame = first_frame.to(self.device, torch.float32)
        batch, _, height, width = first_frame.shape
        video = torch.cat(
            (first_frame[:, :, None], first_frame.new_zeros(batch, 3, frames - 1, height, width)), dim=2
        )
        latent = self.encode_video(video)
        mask = torch.zeros(batch, self.temporal_factor, *latent.shape[2:], device=latent.device)
        mask[:, :, 0] = 1.0
        return torch.cat((mask, latent), dim=1)


def load_frozen_parts(
    path: str | Path,
    *,
    vae: str = "pipeline",
    text_len: int = 512,
    image_to_video: bool = False,
    device: torch.device | str = "cpu",
) -> WanFrozenParts:
    """Load the frozen parts of the pipeline at ``path`` (its root or its transformer folder).

    ``vae="identity"`` uses :class:`IdentityVAE` instead of the pipeline's VAE. The image encoder and
    processor are loaded for ``image_to_video``. Everything is fp32, in eval mode, without gradients.
    """
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    root, _ = pipeline_dirs(path)
    device = torch.device(device)

    def _load(what: str, loader):
        folder = root / what
        if not folder.is_dir():
            raise CheckpointError(f"pipeline {root} has no {what}/ folder")
        try:
            return loader(str(folder))
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise CheckpointError(f"cannot load {folder}: {first}") from None

    def _frozen(module: nn.Module) -> nn.Module:
        module = module.to(device)
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module = module.float()
        module.eval()
        module.requires_grad_(False)
        return module

    if vae == "identity":
        vae_module: nn.Module = IdentityVAE()
    elif vae == "pipeline":
        vae_module = _frozen(_load("vae", AutoencoderKLWan.from_pretrained))
    else:
        raise ConfigError(f"model.vae: expected pipeline or identity, got {vae!r}")
    tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained)
    text_encoder = _frozen(_load("text_encoder", UMT5EncoderModel.from_pretrained))
    image_encoder = image_processor = None
    if image_to_video:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        image_encoder = _frozen(_load("image_encoder", CLIPVisionModel.from_pretrained))
        image_processor = _load("image_processor", CLIPImageProcessor.from_pretrained)
    return WanFrozenParts(vae_module, text_encoder, tokenizer, text_len, image_encoder, image_processor, device)


# --------------------------------------------------------------------------------------------------
# The tiny random pipeline
# --------------------------------------------------------------------------------------------------


def train_tiny_tokenizer(words: Iterable[str], vocab_size: int = 512):
    """A T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended) trained offline.

    A lowercase BPE with a Metaspace pre-tokeniser, as SentencePiece tokenizers split, trained by the
    ``tokenizers`` library on ``words``. Returns a transformers fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False
    )
    corpus = sorted(set(words))
    tokenizer.train_from_iterator([" ".join(corpus), *corpus], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_transformer_config(
    *,
    image_to_video: bool = False,
    latent_channels: int = 4,
    mask_channels: int = 4,
    text_dim: int = 32,
    image_dim: int = 32,
    **overrides: Any,
) -> dict[str, Any]:
    """``WanTransformer3DModel`` arguments of a tiny DiT (2 layers, 2 heads of 16 channels).

    Image-to-video takes [noisy latent; mask; condition latent] (``2 * latent_channels +
    mask_channels`` channels in) and has the CLIP path.
    """
    config: dict[str, Any] = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels,
        out_channels=latent_channels, text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    )
    if image_to_video:
        config["in_channels"] = 2 * latent_channels + mask_channels
    config.update(overrides)
    if image_to_video:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        config.setdefault("image_dim", image_dim)
        config.setdefault("added_kv_proj_dim", width)
    return config


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_tiny_wan_pipeline(
    out_dir: str | Path,
    *,
    image_to_video: bool = False,
    pixel_space: bool = False,
    seed: int = 0,
    words: Iterable[str] = (),
    transformer: dict[str, Any] | None = None,
    transformer_weights: bool = True,
    latent_channels: int = 4,
    text_dim: int = 32,
    image_dim: int = 32,
    flow_shift: float = 3.0,
) -> Path:
    """Write a tiny random diffusers-format Wan2.1 pipeline to ``out_dir``; returns it.

    Args:
        image_to_video: also write ``image_encoder/`` and ``image_processor/`` and an I2V transformer.
        pixel_space: a transformer for ``model.vae: identity`` (3 latent channels, 1 mask channel); the
            random VAE is written all the same.
        seed: seeds every random weight.
        words: extra words for the tokenizer (beside :data:`BASE_WORDS`).
        transformer: overrides of :func:`tiny_transformer_config`.
        transformer_weights: write diffusers' random transformer weights (otherwise config only: the
            trainer initialises the DiT from ``train.seed``).
        latent_channels: the VAE's ``z_dim``.
        text_dim / image_dim: UMT5 and CLIP widths.
        flow_shift: ``shift`` of the scheduler config.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = train_tiny_tokenizer([*BASE_WORDS, *words])
    tokenizer.save_pretrained(str(out / "tokenizer"))
    text_config = UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2,
        num_heads=text_dim // 8, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )
    UMT5EncoderModel(text_config).save_pretrained(str(out / "text_encoder"))

    vae = AutoencoderKLWan(
        base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[round(0.1 * i - 0.2, 3) for i in range(latent_channels)],
        latents_std=[round(1.0 + 0.25 * i, 3) for i in range(latent_channels)],
    )
    vae.save_pretrained(str(out / "vae"))

    channels, mask_channels = (3, 1) if pixel_space else (latent_channels, 4)
    config = tiny_transformer_config(
        image_to_video=image_to_video, latent_channels=channels, mask_channels=mask_channels,
        text_dim=text_dim, image_dim=image_dim, **(transformer or {}),
    )
    dit = WanTransformer3DModel(**config)
    if transformer_weights:
        dit.save_pretrained(str(out / TRANSFORMER_DIR))
    else:
        dit.save_config(str(out / TRANSFORMER_DIR))

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift).save_pretrained(
        str(out / "scheduler")
    )

    index: dict[str, Any] = {
        "_class_name": "WanImageToVideoPipeline" if image_to_video else "WanPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "boundary_ratio": None,
        "expand_timesteps": False,
    }
    if image_to_video:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        vision = CLIPVisionConfig(
            hidden_size=image_dim, intermediate_size=2 * image_dim, projection_dim=image_dim,
            num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        )
        CLIPVisionModel(vision).save_pretrained(str(out / "image_encoder"))
        CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
        ).save_pretrained(str(out / "image_processor"))
        index["image_encoder"] = ["transformers", "CLIPVisionModel"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    _write_json(out / MODEL_INDEX, index)
    return out


__all__ = [
    "IdentityVAE",
    "MODEL_INDEX",
    "WanFrozenParts",
    "is_pipeline_dir",
    "load_frozen_parts",
    "pipeline_dirs",
    "tiny_transformer_config",
    "train_tiny_tokenizer",
    "write_tiny_wan_pipeline",
]
