"""Native configuration for LLaVA (1.5): a CLIP vision tower, a two-layer projector and a Llama
decoder, readable from and writable to Hugging Face ``config.json`` (``model_type`` ``llava``).

The decoder is the shared one of :mod:`openspeed.models.layers.decoder`; its config is Qwen2.5-VL's
:class:`~openspeed.models.qwen2_5_vl.config.TextConfig` with Llama's bias flags and 1-D RoPE (all
rotary channels in the first M-RoPE section: text positions are equal in the three rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from openspeed.errors import ConfigError
from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig

MODEL_TYPE = "llava"
HF_ARCHITECTURE = "LlavaForConditionalGeneration"
STRATEGIES = ("default", "full")


@dataclass
class LlamaTextConfig(TextConfig):
    """The Llama decoder. Defaults are transformers' ``LlamaConfig`` ones."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] = ()
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if not self.mrope_section:  # 1-D RoPE: every rotary channel reads the (single) text position
            self.mrope_section = (self.hidden_size // max(1, self.num_attention_heads) // 2, 0, 0)
        super().__post_init__()

    @property
    def qkv_bias(self) -> bool:  # type: ignore[override]
        return self.attention_bias

    @property
    def o_bias(self) -> bool:  # type: ignore[override]
        return self.attention_bias


@dataclass
class CLIPVisionConfig:
    """The CLIP vision tower and what LLaVA takes from it. Defaults: LLaVA-1.5's ViT-L/14 at 336 px."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Which hidden states feed the projector: hidden state 0 is the embeddings after pre_layrnorm,
    # hidden state i the output of layer i; negative values count from the last. A list concatenates.
    feature_layer: int | tuple[int, ...] = -2
    select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    out_hidden_size: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.feature_layer, (list, tuple)):
            self.feature_layer = tuple(int(i) for i in self.feature_layer)
            if not self.feature_layer:
                raise ConfigError("vision_feature_layer: an empty list selects no hidden state")
        else:
            self.feature_layer = int(self.feature_layer)
        if self.select_strategy not in STRATEGIES:
            raise ConfigError(
                f"vision_feature_select_strategy '{self.select_strategy}' is not supported "
                f"(known: {', '.join(STRATEGIES)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        bad = [i for i in self.feature_layers if not 0 <= i <= self.num_hidden_layers]
        if bad:
            raise ConfigError(f"vision_feature_layer {self.feature_layer} is outside the tower's "
                              f"{self.num_hidden_layers + 1} hidden states")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Patches per image (the tower adds one class token)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """LLM placeholder tokens per image: the patches, plus the class token under ``full``."""
        return self.num_patches + (self.select_strategy == "full")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The selected hidden states as non-negative indices (0 = embeddings, i = after layer i)."""
        layers = self.feature_layer if isinstance(self.feature_layer, tuple) else (self.feature_layer,)
        return tuple(i if i >= 0 else self.num_hidden_layers + 1 + i for i in layers)

    @property
    def patch_dim(self) -> int:
        """Values of one image (``pixel_values`` rows are whole images, channels-first)."""
        return self.num_channels * self.image_size * self.image_size


_TEXT_KEYS = {f.name for f in dataclasses.fields(LlamaTextConfig)} - {"rope_theta", "mrope_section"}
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps", "initializer_range")


@dataclass
class LlavaConfig(Qwen2_5_VLConfig):
    """Full LLaVA configuration: CLIP tower and projector, Llama decoder, the image token."""

    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: LlamaTextConfig = field(default_factory=LlamaTextConfig)
    image_token_id: int = 32000
    video_token_id: int = -1  # none: -1 matches no token id
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool = False

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    HF_ARCHITECTURE: ClassVar[str] = HF_ARCHITECTURE
    ROPE_3D: ClassVar[bool] = False

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 5, or the hub's sparse one)."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        text, vision = d.get("text_config") or {}, d.get("vision_config") or {}
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ConfigError("llava text_config and vision_config must be mappings")
        for section, expected in ((text, "llama"), (vision, "clip_vision_model")):
            kind = section.get("model_type", expected)
            if kind != expected:
                raise ConfigError(f"llava with a {kind} model is not supported (known: {expected})")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type '{rope_type}' is not supported for llava (known: default)")
        text_kwargs = {k: v for k, v in text.items() if k in _TEXT_KEYS}
        text_kwargs["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", LlamaTextConfig.rope_theta)))
        heads = text_kwargs.get("num_attention_heads", LlamaTextConfig.num_attention_heads)
        if text_kwargs.get("num_key_value_heads") is None:
            text_kwargs["num_key_value_heads"] = heads
        head_dim = text.get("head_dim")
        hidden = text_kwargs.get("hidden_size", LlamaTextConfig.hidden_size)
        if head_dim is not None and head_dim != hidden // heads:
            raise ConfigError(f"llava text head_dim {head_dim} other than hidden_size / num_attention_heads "
                              f"({hidden // heads}) is not supported")
        vision_kwargs = {k: vision[k] for k in _VISION_KEYS if k in vision}
        for key in ("image_size", "patch_size"):
            if isinstance(vision_kwargs.get(key), (list, tuple)):
                side = set(vision_kwargs[key])
                if len(side) != 1:
                    raise ConfigError(f"llava vision {key} {vision_kwargs[key]} is not square")
                vision_kwargs[key] = side.pop()
        strategy = d.get("vision_feature_select_strategy", "default")
        try:
            text_config = LlamaTextConfig(**text_kwargs)
            vision_config = CLIPVisionConfig(
                **vision_kwargs,
                feature_layer=d.get("vision_feature_layer", -2),
                select_strategy=strategy,
                projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                projector_bias=bool(d.get("multimodal_projector_bias", True)),
                out_hidden_size=text_config.hidden_size,
            )
            return cls(
                vision=vision_config,
                text=text_config,
                image_token_id=int(d.get("image_token_index", d.get("image_token_id", 32000))),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid llava config: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 ``config.json`` dict that ``transformers.LlavaConfig`` accepts."""
        t, v = self.text, self.vision
        text = {k: getattr(t, k) for k in sorted(_TEXT_KEYS)}
        text.update(model_type="llama", head_dim=t.head_dim, tie_word_embeddings=self.tie_word_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta})
        vision = {k: getattr(v, k) for k in _VISION_KEYS}
        vision["model_type"] = "clip_vision_model"
        feature_layer = list(v.feature_layer) if isinstance(v.feature_layer, tuple) else v.feature_layer
        return {
            "architectures": [HF_ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "image_token_index": self.image_token_id,
            "image_seq_length": v.tokens_per_image,
            "projector_hidden_act": v.projector_hidden_act,
            "multimodal_projector_bias": v.projector_bias,
            "vision_feature_layer": feature_layer,
            "vision_feature_select_strategy": v.select_strategy,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text,
            "vision_config": vision,
        }
