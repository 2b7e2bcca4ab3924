"""Native configuration for Qwen2-VL, readable from and writable to Hugging Face ``config.json``.

The text decoder and the special tokens are Qwen2.5-VL's (:class:`Qwen2VLConfig` subclasses
:class:`~openspeed.models.qwen2_5_vl.config.Qwen2_5_VLConfig`); only the vision section differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from openspeed.errors import ConfigError
from openspeed.models.qwen2_5_vl.config import (
    Qwen2_5_VLConfig,
    TextConfig,
    VisionGeometry,
    _vision_rope_theta,
)

MODEL_TYPE = "qwen2_vl"
HF_ARCHITECTURE = "Qwen2VLForConditionalGeneration"


@dataclass
class Qwen2VLVisionConfig(VisionGeometry):
    """The vision tower (a ViT with full attention over each frame) and its patch merger.

    Native names follow Qwen2.5-VL's vision section, so the shared code reads both: ``hidden_size``
    is the tower's width (``embed_dim`` in ``config.json``), ``out_hidden_size`` the merger's output
    (``config.json``'s ``hidden_size``) and ``intermediate_size`` the MLP width
    (``embed_dim * mlp_ratio``). Defaults are Hugging Face's for keys absent from ``vision_config``.
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    # A video's temporal M-RoPE index counts frame groups, whatever their duration (Qwen2.5-VL
    # scales it by tokens_per_second * second_per_grid_ts).
    tokens_per_second: ClassVar[None] = None
    # fc1 -> activation -> fc2: two weight matrices per block MLP (Qwen2.5-VL's SwiGLU has three).
    mlp_matrices: ClassVar[int] = 2

    def __post_init__(self) -> None:
        self.check_heads()

    @property
    def fullatt_block_indexes(self) -> tuple[int, ...]:
        """Every block attends over whole frames (there are no windows)."""
        return tuple(range(self.depth))


def _default_vision() -> Qwen2VLVisionConfig:
    return Qwen2VLVisionConfig(out_hidden_size=TextConfig.hidden_size)


@dataclass
class Qwen2VLConfig(Qwen2_5_VLConfig):
    """Full Qwen2-VL configuration: Qwen2.5-VL's decoder and tokens with the Qwen2-VL vision tower."""

    vision: Qwen2VLVisionConfig = field(default_factory=_default_vision)

    MODEL_TYPE: ClassVar[str] = MODEL_TYPE
    HF_ARCHITECTURE: ClassVar[str] = HF_ARCHITECTURE

    @classmethod
    def vision_from_hf(cls, vision: dict[str, Any]) -> Qwen2VLVisionConfig:
        defaults = Qwen2VLVisionConfig
        embed_dim = vision.get("embed_dim", defaults.hidden_size)
        mlp_ratio = vision.get("mlp_ratio", 4)
        intermediate = embed_dim * mlp_ratio
        if intermediate != int(intermediate):
            raise ConfigError(f"vision embed_dim {embed_dim} x mlp_ratio {mlp_ratio} is not a whole MLP width")
        return Qwen2VLVisionConfig(
            depth=vision.get("depth", defaults.depth),
            hidden_size=embed_dim,
            intermediate_size=int(intermediate),
            num_heads=vision.get("num_heads", defaults.num_heads),
            in_channels=vision.get("in_channels", vision.get("in_chans", defaults.in_channels)),
            patch_size=vision.get("patch_size", vision.get("spatial_patch_size", defaults.patch_size)),
            spatial_merge_size=vision.get("spatial_merge_size", defaults.spatial_merge_size),
            temporal_patch_size=vision.get("temporal_patch_size", defaults.temporal_patch_size),
            out_hidden_size=vision.get("hidden_size", defaults.out_hidden_size),
            hidden_act=vision.get("hidden_act", defaults.hidden_act),
            rope_theta=_vision_rope_theta(vision),
            initializer_range=vision.get("initializer_range", defaults.initializer_range),
        )

    def vision_to_hf(self) -> dict[str, Any]:
        v = self.vision
        if v.intermediate_size % v.hidden_size:
            raise ConfigError(
                f"vision intermediate_size {v.intermediate_size} is not a multiple of embed_dim {v.hidden_size}: "
                "transformers' Qwen2-VL stores the MLP width as an integer mlp_ratio"
            )
        return {
            "depth": v.depth,
            "embed_dim": v.hidden_size,
            "hidden_size": v.out_hidden_size,
            "mlp_ratio": v.intermediate_size // v.hidden_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "hidden_act": v.hidden_act,
            "initializer_range": v.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
