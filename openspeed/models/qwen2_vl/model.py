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
from openspeed.models.layers.rope import VisionRotaryEmbedding
from openspeed.models.qwen2_5_vl.model import (
    VISION_NORM_EPS,
    PatchEmbed,
    PatchMerger,
    Qwen2_5_VLModel,
    VisionAttention,
    vision_frame_cu_seqlens,
    vision_rotary_positions,
)
from openspeed.models.qwen2_vl.config import Qwen2VLConfig, Qwen2VLVisionConfig
from openspeed.ops.attention import AttentionPlan, attention_plan


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


class VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block of the vision tower."""

    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.mlp = VisionMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:
        """``x``: (num_patches, hidden); attention stays inside each ``cu_seqlens`` segment (a frame)."""
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, plan=plan)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(PatchMerger):
    """Qwen2.5-VL's merger with a LayerNorm in front (concatenate each merge block, Linear-GELU-Linear)."""

    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__(cfg)
        self.ln_q = nn.LayerNorm(cfg.hidden_size, eps=VISION_NORM_EPS)


class VisionTransformer(nn.Module):
    """Qwen2-VL vision tower: every block attends over the whole frame its patch belongs to."""

    def __init__(self, cfg: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary_pos_emb = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = VisionPatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode packed patches of all images/videos in ``grid_thw`` order.

        Args:
            pixel_values: (sum t*h*w, C*T*P*P), patches in the processor's merge-block order.
            grid_thw: (n, 3) patch grid of each image/video.

        Returns:
            (sum t*h*w / merge^2, out_hidden): one embedding per merged token, in input order.
        """
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
