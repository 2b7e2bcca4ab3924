"""Native configuration for Qwen2.5-VL, readable from and writable to Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from openspeed.errors import ConfigError

MODEL_TYPE = "qwen2_5_vl"
HF_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


class VisionGeometry:
    """What a Qwen vision tower derives from its width, heads and patching (the vision configs of
    the Qwen-VL families inherit it)."""

    hidden_size: int
    num_heads: int
    in_channels: int
    temporal_patch_size: int
    patch_size: int

    def check_heads(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(f"vision head dim {self.head_dim} must be a multiple of 4 for 2-D rotary")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch row of ``pixel_values``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class VisionConfig(VisionGeometry):
    """The vision tower (ViT with window attention) and its patch merger.

    Defaults are the ones Hugging Face uses when a key is absent from ``vision_config``.
    """

    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    # gate, up, down: three weight matrices per block MLP (SwiGLU).
    mlp_matrices: ClassVar[int] = 3

    def __post_init__(self) -> None:
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        self.check_heads()
        if self.window_size // self.spatial_merge_size // self.patch_size < 1:
            raise ConfigError(
                f"vision window_size {self.window_size} is smaller than one merged patch "
                f"({self.spatial_merge_size} x {self.patch_size} pixels)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")


@dataclass
class TextConfig:
    """The Qwen2 decoder. Defaults are Hugging Face's for keys absent from ``text_config``."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = {self.head_dim // 2}"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    # Which projections carry a bias (Qwen2: q, k and v only); read by the shared decoder.
    qkv_bias: ClassVar[bool] = True
    o_bias: ClassVar[bool] = False
    mlp_bias: ClassVar[bool] = False


@dataclass
class Qwen2_5_VLConfig:
    """Full Qwen2.5-VL configuration: vision tower, text decoder and the special token ids.

    Qwen2-VL (``openspeed.models.qwen2_vl``) subclasses it with its own vision section: the text
    decoder, the token ids and the ``config.json`` layout around them are the same.
    """

    # Hugging Face's stand-alone defaults disagree (vision out 3584, text hidden 8192); the bare
    # default here is made consistent so that ``Qwen2_5_VLConfig()`` builds a working model.
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(out_hidden_size=TextConfig.hidden_size))
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    HF_ARCHITECTURE: ClassVar[str] = HF_ARCHITECTURE
    # Vision tokens take 3-D (temporal, height, width) M-RoPE positions; False: every token 1-D.
    ROPE_3D: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text hidden_size "
                f"{self.text.hidden_size}"
            )

    @classmethod
    def vision_from_hf(cls, vision: dict[str, Any]) -> VisionConfig:
        """The vision section from ``config.json``'s ``vision_config``."""
        kwargs = _pick(vision, VisionConfig, skip=("rope_theta", "in_channels", "patch_size"))
        kwargs["in_channels"] = vision.get("in_channels", vision.get("in_chans", VisionConfig.in_channels))
        kwargs["patch_size"] = vision.get("patch_size", vision.get("spatial_patch_size", VisionConfig.patch_size))
        kwargs["rope_theta"] = _vision_rope_theta(vision)
        return VisionConfig(**kwargs)

    def vision_to_hf(self) -> dict[str, Any]:
        """``config.json``'s ``vision_config`` (without ``model_type``)."""
        vision = dataclasses.asdict(self.vision)
        vision.pop("rope_theta")
        vision["fullatt_block_indexes"] = list(self.vision.fullatt_block_indexes)
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.vision.rope_theta}
        return vision

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen2_5_VLConfig:
        """Build from a Hugging Face ``config.json`` dict.

        Accepts the transformers-5 layout (nested ``text_config`` with ``rope_parameters``) and the
        older flat layout of hub checkpoints (text keys at top level, ``rope_scaling`` of type
        ``mrope`` and a top-level ``rope_theta``). Unknown keys are ignored.
        """
        name = cls.MODEL_TYPE
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        text = d.get("text_config")
        if not isinstance(text, dict):
            text = d  # old flat layout: the decoder's keys live at the top level
        vision = d.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise ConfigError("vision_config must be a mapping")

        if text.get("use_sliding_window", False):
            raise ConfigError(f"use_sliding_window=true is not supported for {name}")

        rope = (
            text.get("rope_parameters")
            or text.get("rope_scaling")
            or d.get("rope_parameters")
            or d.get("rope_scaling")
            or {}
        )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"rope type '{rope_type}' is not supported for {name} (known: default, mrope)")
        rope_theta = rope.get(
            "rope_theta", text.get("rope_theta", d.get("rope_theta", TextConfig.rope_theta))
        )

        num_heads = text.get("num_attention_heads", TextConfig.num_attention_heads)
        text_kwargs = _pick(
            text,
            TextConfig,
            skip=("rope_theta", "mrope_section", "num_key_value_heads"),
        )
        text_kwargs["rope_theta"] = float(rope_theta)
        text_kwargs["mrope_section"] = tuple(rope.get("mrope_section", TextConfig.mrope_section))
        kv_heads = text.get("num_key_value_heads")
        text_kwargs["num_key_value_heads"] = num_heads if kv_heads is None else kv_heads

        top_kwargs = _pick(d, cls, skip=("vision", "text", "tie_word_embeddings"))
        # transformers < 5 could store the tying flag inside text_config; either place turns it on.
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        try:
            return cls(
                vision=cls.vision_from_hf(vision),
                text=TextConfig(**text_kwargs),
                tie_word_embeddings=tie,
                **top_kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {name} config: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """Return a transformers-5 style ``config.json`` dict that the transformers config class accepts."""
        text = dataclasses.asdict(self.text)
        text.pop("rope_theta")
        text.pop("mrope_section")
        text["model_type"] = f"{self.MODEL_TYPE}_text"
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.text.rope_theta,
            "mrope_section": list(self.text.mrope_section),
        }
        vision = {**self.vision_to_hf(), "model_type": f"{self.MODEL_TYPE}_vision"}
        return {
            "architectures": [self.HF_ARCHITECTURE],
            "model_type": self.MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text,
            "vision_config": vision,
        }


def _vision_rope_theta(vision: dict[str, Any]) -> float:
    rope = vision.get("rope_parameters") or {}
    return float(rope.get("rope_theta", vision.get("rope_theta", VisionConfig.rope_theta)))


def _pick(source: dict[str, Any], cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``source`` that name fields of dataclass ``cls`` (minus ``skip``)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in source.items() if k in names}
