"""Wan2.1 as a model family: its config section, old key spellings, parts, and command-line verbs.

Read before torch is imported (see :mod:`openspeed.models.families`); the heavy half is ``spec.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from openspeed.errors import ConfigError
from openspeed.models.families import Family, Generator, register_family
from openspeed.models.wan import commands
from openspeed.models.wan.config import DIFFUSERS_CLASS_NAME, MODEL_NAME

# The Wan DiT's attention projections and FFN (native names; diffusers' attn1.to_q ... work too).
LORA_TARGETS = ("self_attn.*_proj", "cross_attn.*_proj", "ffn.fc1", "ffn.fc2")

# Freezable parts: native parameter-name prefixes of each.
PARTS = {
    "patch_embed": ("patch_embed.",),
    "condition_embed": ("time_embed.", "time_modulation.", "text_embed.", "image_embed."),
    "blocks": ("blocks.",),
    "head": ("out_norm.", "out_proj.", "out_modulation"),
}


@dataclass
class WanSection:
    """The ``wan:`` config section (docs/config.md lists every key)."""

    vae: Literal["pipeline", "identity"] = "pipeline"
    """The pipeline's VAE, or identity (pixel space: the latent is the video in [-1, 1])."""
    video_buckets: list[str] = field(default_factory=lambda: ["81x480x832"])
    """FRAMESxHEIGHTxWIDTH buckets clips are resized / cropped into."""
    frame_interval: int = 1
    """Take every N-th frame of a clip, from its first."""
    text_len: int = 512
    """Caption tokens (UMT5 states, zero-padded); image-to-video needs 512."""
    caption_dropout: float = 0.1
    """Probability of training a sample on the empty caption (for classifier-free guidance)."""
    flow_shift: float = 5.0
    """Timestep shift of flow matching, sigma = shift*u / (1 + (shift-1)*u); also sampling's default."""
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """Distribution of u before the shift."""
    val_sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Noise levels of the validation loss (each validation sample at each, with fixed noise)."""
    generate_jitter: float = 3.0
    """moving_shapes: largest random offset (pixels) of a path across and along its direction."""
    generate_dit: dict = field(default_factory=dict)
    """moving_shapes: WanTransformer3DModel arguments of the demo's tiny DiT (over the defaults)."""

    def check(self) -> None:
        for bucket in self.video_buckets:
            if not re.fullmatch(r"\s*[1-9]\d*x[1-9]\d*x[1-9]\d*\s*", str(bucket).lower()):
                raise ConfigError(f"wan.video_buckets: '{bucket}' is not FRAMESxHEIGHTxWIDTH (e.g. 81x480x832)")
        if self.frame_interval < 1:
            raise ConfigError(f"wan.frame_interval: must be at least 1, got {self.frame_interval}")
        if self.text_len < 1:
            raise ConfigError(f"wan.text_len: must be at least 1, got {self.text_len}")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"wan.caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not self.flow_shift > 0:
            raise ConfigError(f"wan.flow_shift: must be positive, got {self.flow_shift}")
        if not self.val_sigmas or not all(0 < s <= 1 for s in self.val_sigmas):
            raise ConfigError(f"wan.val_sigmas: give noise levels in (0, 1], got {self.val_sigmas}")


ALIASES = {
    "model.vae": "wan.vae",
    "data.video_buckets": "wan.video_buckets",
    "data.frame_interval": "wan.frame_interval",
    "data.text_len": "wan.text_len",
    "data.caption_dropout": "wan.caption_dropout",
    "train.flow_shift": "wan.flow_shift",
    "train.timestep_sampling": "wan.timestep_sampling",
    "data.generate_jitter": "wan.generate_jitter",
    "data.generate_dit": "wan.generate_dit",
}

REFUSED = {
    "parallel.pp": "the DiT has no pipeline plan yet; use dp, cp or tp",
    "parallel.sequence_parallel": "the Wan tensor-parallel plan has no sequence parallelism; use parallel.cp "
                                  "to split the video tokens",
    "data.packing": "packing is for token sequences; Wan clips are bucketed instead",
    "data.max_seq_len": "clips are sized by wan.video_buckets",
    "train.eval_blank_images": "the blank-image control belongs to visual question answering",
    "memory.offload_activations": "not available for the DiT yet (memory.recompute is)",
    "memory.offload_optimizer": "not available for the DiT yet (memory.recompute is)",
    "memory.budget_gb": "adaptive recompute is not available for the DiT yet (memory.recompute is)",
}


def check(cfg) -> None:
    """Combinations the Wan plans cannot run."""
    if cfg.parallel.tp > 1 and cfg.model.lora.rank > 0:
        raise ConfigError(f"parallel.tp={cfg.parallel.tp}: LoRA with tensor parallelism is not available for wan "
                          "training yet (use dp or cp)")


register_family(Family(
    name=MODEL_NAME,
    model_types=(DIFFUSERS_CLASS_NAME,),
    spec_module="openspeed.models.wan.spec",
    parts=tuple(PARTS),
    lora_targets=LORA_TARGETS,
    section=WanSection,
    aliases=ALIASES,
    refused=REFUSED,
    generators=(Generator("moving_shapes", commands.prepare_moving_shapes),),
    commands=(commands.GENERATE,),
    data_commands=(commands.TINY_PIPELINE, commands.MOVING_SHAPES, commands.EXTRACT_FEATURES),
    check=check,
))
