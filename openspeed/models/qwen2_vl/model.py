"""Native Qwen2-VL: a ViT vision tower with full attention over each frame, a patch merger and the
Qwen2 decoder with M-RoPE.

Qwen2.5-VL (:mod:`openspeed.models.qwen2_5_vl.model`) grew out of this model: it keeps the patch
embedding, the 2-D vision rotary, the vision attention, the merger's shape and the whole language
side, and changes the tower (RMSNorm, a SwiGLU MLP, window attention). So only the tower is written
here; :class:`Qwen2VLModel` is Qwen2.5-VL's model built with it. Parameter names follow the Hugging
Face module tree below ``model.``.
"""

from __future__ import annotations

import torch
from torch import nn

from openspeed.models.layers.mlp import get_activation
from openspeed.models.qwen2_5_vl.model import (
    PatchMerger,
    Qwen2_5_VLModel,
    vision_frame_cu_seqlens,
    vision_rotary_positions,
)
from openspeed.models.qwen2_5_vl.model import VisionBlock as Qwen2_5_VisionBlock
from openspeed.models.qwen2_5_vl.model import VisionTransformer as Qwen2_5_VisionTransformer
from openspeed.models.qwen2_vl.config import Qwen2VLConfig, Qwen2VLVisionConfig
from openspeed.ops.attention import attention_plan


class VisionMLP(nn.Module):
    """``fc2(act(fc1(x)))`` (QuickGELU in the released checkpoints)."""

    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act_name = cfg.hidden_act
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"


class VisionBlock(Qwen2_5_VisionBlock):
    """Pre-LayerNorm transformer block of the vision tower (the attention is Qwen2.5-VL's)."""

    norm_layer = nn.LayerNorm
    mlp_layer = VisionMLP


class VisionPatchMerger(PatchMerger):
    """Qwen2.5-VL's merger with a LayerNorm in front (concatenate each merge block, Linear-GELU-Linear)."""

    norm_layer = nn.LayerNorm


class VisionTransformer(Qwen2_5_VisionTransformer):
    """Qwen2-VL vision tower: Qwen2.5-VL's built of the blocks above, every block attending over the
    whole frame its patch belongs to (no windows, so no reordering)."""

    block = VisionBlock
    merger_cls = VisionPatchMerger

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(sum t*h*w, C*T*P*P) patches of the images / videos of ``grid_thw`` -> one embedding per
        merged token, in input order (the call of Qwen2.5-VL's tower)."""
        grid_cpu = grid_thw.cpu()
        cu_frames = vision_frame_cu_seqlens(grid_cpu)
        positions = vision_rotary_positions(grid_cpu, self.cfg.spatial_merge_size)
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary_pos_emb(positions.to(pixel_values.device))
        plan = attention_plan(cu_seqlens=cu_frames)  # one for all blocks (CPU bounds: no sync)
        for block in self.blocks:
            x = block(x, cos, sin, cu_frames, plan=plan)
        return self.merger(x)


class Qwen2VLModel(Qwen2_5_VLModel):
    """Qwen2-VL for conditional generation: ``visual`` -> ``language_model`` -> ``lm_head``.

    Everything but the vision tower is Qwen2.5-VL's: the embedding and vision scatter, M-RoPE
    positions (a video's temporal index counts frame groups: ``config.vision.tokens_per_second`` is
    ``None``), the decoder, the loss, packing, the KV cache and the call signature.
    """

    vision_tower = VisionTransformer

    def __init__(self, config: Qwen2VLConfig) -> None:
        super().__init__(config)
