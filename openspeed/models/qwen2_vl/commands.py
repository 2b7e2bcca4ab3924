"""Qwen2-VL's command-line pieces: the synthetic shapes VQA set with a Qwen2-VL model directory
(``data.generate: qwen2_vl_shapes`` and ``openspeed data shapes --family qwen2_vl``). Light at import."""

from __future__ import annotations

from typing import Any

from openspeed.models.qwen2_5_vl import commands as qwen2_5_vl_commands

SHAPES_KEYS = qwen2_5_vl_commands.SHAPES_KEYS


def shapes_config(base: dict[str, Any], preprocessor: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shapes set's tiny ``config.json`` (Qwen2.5-VL layout) as a Qwen2-VL one: same decoder and
    tokens; the vision tower keeps its width, depth, heads and patching, with a QuickGELU MLP of the
    same width and full attention (no windows). The image processor is the same."""
    vision = base["vision_config"]
    width, mlp = vision["hidden_size"], vision["intermediate_size"]
    if mlp % width:
        raise ValueError(f"vision intermediate_size {mlp} must be a multiple of the width {width} (mlp_ratio)")
    return {
        **base,
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "text_config": {**base["text_config"], "model_type": "qwen2_vl_text"},
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": vision["depth"],
            "embed_dim": width,
            "hidden_size": vision["out_hidden_size"],
            "mlp_ratio": mlp // width,
            "num_heads": vision["num_heads"],
            "in_channels": vision["in_channels"],
            "patch_size": vision["patch_size"],
            "spatial_merge_size": vision["spatial_merge_size"],
            "temporal_patch_size": vision["temporal_patch_size"],
            "hidden_act": "quick_gelu",
            "initializer_range": vision["initializer_range"],
        },
    }, preprocessor


def prepare_shapes(cfg) -> None:
    """``data.generate: qwen2_vl_shapes``: the shapes VQA set and its tiny Qwen2-VL model directory, once."""
    qwen2_5_vl_commands.prepare_shapes(cfg, config_transform=shapes_config)
