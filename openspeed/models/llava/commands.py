"""LLaVA's command-line pieces: the synthetic shapes VQA set with a LLaVA model directory
(``data.generate: llava_shapes`` and ``openspeed data shapes --family llava``). Light at import."""

from __future__ import annotations

from typing import Any

from openspeed.models.qwen2_5_vl import commands as qwen2_5_vl_commands

SHAPES_KEYS = qwen2_5_vl_commands.SHAPES_KEYS
IMAGE_SIZE = 112  # the shapes images' size: no resize
PATCH_SIZE = 14  # an 8 x 8 grid of patches per image: 64 image tokens


def shapes_config(base: dict[str, Any], preprocessor: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shapes set's tiny model as LLaVA-1.5's layout: the same decoder sizes as a Llama (1-D RoPE,
    no biases), a CLIP tower of the Qwen tower's width and heads and depth at 112 px, a GELU projector,
    features from the second-to-last layer without the class token; images padded to a square with
    the mean colour, as LLaVA-1.5 does, then resized and centre-cropped. The image placeholder is the
    tokenizer's ``<|image_pad|>``."""
    text, vision = base["text_config"], base["vision_config"]
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": base["image_token_id"],
        "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": base["tie_word_embeddings"],
        "dtype": "float32",
        "text_config": {
            "model_type": "llama",
            **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "hidden_act",
                                    "max_position_embeddings", "initializer_range", "rms_norm_eps",
                                    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
            "rope_parameters": {"rope_type": "default", "rope_theta": text["rope_parameters"]["rope_theta"]},
            "attention_bias": False,
            "mlp_bias": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"],
            # One layer more than the Qwen tower: the last one is not read (feature layer -2).
            "num_hidden_layers": vision["depth"] + 1,
            "num_attention_heads": vision["num_heads"],
            "num_channels": 3,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "initializer_range": vision["initializer_range"],
        },
    }
    processor = {
        "image_processor_type": "LlavaImageProcessor",
        "do_pad": True,
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": preprocessor["rescale_factor"],
        "do_normalize": True,
        "image_mean": preprocessor["image_mean"],
        "image_std": preprocessor["image_std"],
        "do_convert_rgb": True,
    }
    return config, processor


def prepare_shapes(cfg) -> None:
    """``data.generate: llava_shapes``: the shapes VQA set and its tiny LLaVA model directory, once."""
    qwen2_5_vl_commands.prepare_shapes(cfg, config_transform=shapes_config)
