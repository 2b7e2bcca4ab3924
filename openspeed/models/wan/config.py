"""Native configuration of the Wan2.1 DiT, read from / written to diffusers' ``config.json``.

The fields are exactly the constructor arguments of diffusers' ``WanTransformer3DModel`` (and carry its
defaults, those of the 14B model), so a diffusers transformer directory round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from openspeed.errors import ConfigError

# diffusers configs name their class instead of a ``model_type``; this is the registry key.
DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
MODEL_NAME = "wan"
# The diffusers version the config layout was read from (written into exported configs).
DIFFUSERS_VERSION = "0.42.1"
# RoPE base of all three axes; fixed in diffusers and the released checkpoints, not a config key.
ROPE_THETA = 10000.0
# The UMT5 text encoder's context length. diffusers hardcodes it: with image K/V projections the last
# 512 context tokens are text and everything before them are image tokens.
TEXT_CONTEXT_LENGTH = 512


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class WanConfig:
    """Wan2.1 / 2.2 DiT hyper-parameters (diffusers ``WanTransformer3DModel`` argument names).

    Attributes:
        patch_size: (frames, height, width) of one latent patch.
        num_attention_heads / attention_head_dim: heads and channels per head; the model width is
            their product.
        in_channels / out_channels: latent channels in and out (``None`` out means ``in_channels``).
        text_dim: width of the text-encoder (UMT5) embeddings.
        freq_dim: width of the sinusoidal timestep embedding.
        ffn_dim: hidden width of each block's feed-forward network.
        num_layers: number of transformer blocks.
        cross_attn_norm: LayerNorm (with affine) before the cross-attention; identity otherwise.
        qk_norm: kept for round-tripping; diffusers always applies RMS norm across heads to q and k.
        eps: epsilon of every norm inside the blocks and of the output norm.
        image_dim: width of the CLIP image embeddings (image-to-video); ``None`` for text-to-video.
        added_kv_proj_dim: input width of the extra image K/V projections of the cross-attention.
        rope_max_seq_len: longest latent axis (in patches) the rotary tables cover.
        pos_embed_seq_len: learned position embedding over the image tokens (first-last-frame model).
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        if (not isinstance(self.patch_size, (list, tuple)) or len(self.patch_size) != 3
                or not all(_is_int(p) for p in self.patch_size)):
            raise ConfigError(
                f"wan patch_size must be 3 integers (frames, height, width), got {self.patch_size!r}"
            )
        self.patch_size = tuple(self.patch_size)
        if self.out_channels is None or self.out_channels == 0:
            self.out_channels = self.in_channels  # diffusers: ``out_channels or in_channels``
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value > 0):
                raise ConfigError(f"wan {key} must be a positive integer or null, got {value!r}")
        if not isinstance(self.cross_attn_norm, bool):
            raise ConfigError(f"wan cross_attn_norm must be true or false, got {self.cross_attn_norm!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ConfigError(f"wan eps must be a positive number, got {self.eps!r}")
        positive = {
            "patch_size": min(self.patch_size),
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "rope_max_seq_len": self.rope_max_seq_len,
        }
        for key, value in positive.items():
            if not (_is_int(value) and value > 0):
                raise ConfigError(f"wan {key} must be a positive integer, got {value!r}")
        if self.attention_head_dim % 2:
            raise ConfigError(f"wan attention_head_dim {self.attention_head_dim} must be even for 3-D RoPE")
        if self.image_dim is not None and self.added_kv_proj_dim not in (None, self.hidden_size):
            raise ConfigError(
                f"wan added_kv_proj_dim {self.added_kv_proj_dim} must equal the model width "
                f"{self.hidden_size} (the image tokens are projected to it)"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ConfigError("wan pos_embed_seq_len needs image_dim (it embeds the image tokens)")

    @property
    def hidden_size(self) -> int:
        """Model width: ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_volume(self) -> int:
        """Latent positions in one patch (``prod(patch_size)``)."""
        return math.prod(self.patch_size)

    @property
    def rope_axis_dims(self) -> tuple[int, int, int]:
        """Head channels rotated by the (frame, height, width) position, as Wan splits them.

        Height and width get ``2 * (head_dim // 6)`` channels each, frames get the rest.
        """
        spatial = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * spatial, spatial, spatial

    @property
    def has_image_kv(self) -> bool:
        """Whether the cross-attention has the extra image K/V projections (Wan2.1 I2V)."""
        return self.added_kv_proj_dim is not None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> WanConfig:
        """Build from a diffusers ``config.json`` dict; other keys (``_diffusers_version``...) are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        class_name = d.get("_class_name", DIFFUSERS_CLASS_NAME)
        if class_name != DIFFUSERS_CLASS_NAME:
            raise ConfigError(f"config _class_name '{class_name}' is not {DIFFUSERS_CLASS_NAME}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid wan config: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A diffusers ``config.json`` dict that ``WanTransformer3DModel.from_config`` accepts."""
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
        out.update(dataclasses.asdict(self))
        out["patch_size"] = list(self.patch_size)
        return out
