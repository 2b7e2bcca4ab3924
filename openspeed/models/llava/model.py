"""Native LLaVA: a CLIP ViT, a two-layer projector and a Llama decoder.

Plain PyTorch, no distributed code. The CLIP tower and the projector are written here; the decoder,
the embedding of the batch, the loss, packing, the KV cache and the call signature are the shared
causal VLM of :class:`~openspeed.models.qwen2_5_vl.model.Qwen2_5_VLModel` (with text positions only,
its M-RoPE is Llama's 1-D RoPE). Parameter names: ``visual.vision_tower.*`` and
``visual.multi_modal_projector.*`` hold transformers' ``model.vision_tower.*`` and
``model.multi_modal_projector.*``, ``language_model.*`` and ``lm_head`` its decoder and head.
"""

from __future__ import annotations

import torch
from torch import nn

from openspeed.models.layers.mlp import get_activation
from openspeed.models.llava.config import CLIPVisionConfig, LlavaConfig
from openspeed.models.qwen2_5_vl.model import Qwen2_5_VLModel
from openspeed.ops.attention import attention


class CLIPEmbeddings(nn.Module):
    """Patch embedding, a learned class token in front, and learned absolute positions."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) -> (images, 1 + patches, hidden)."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Full multi-head self-attention over one image's tokens."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: a tensor-parallel rank holds only its heads.
        q, k, v = (proj(x).view(b, s, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))
        out = attention(q, k, v, causal=False, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` (QuickGELU in OpenAI's CLIP)."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer (transformers' ``CLIPVisionModel``), returning the hidden states
    LLaVA selects. ``post_layernorm`` only serves CLIP's pooled output: it is kept so checkpoints
    round-trip, and never runs here (nor in transformers' LLaVA, whose features skip it)."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) -> (images, tokens, hidden * len(feature layers)): the selected hidden
        states side by side, the class token dropped under the ``default`` strategy. Layers after the
        last selected one are not run (their output feeds nothing)."""
        wanted = self.cfg.feature_layers
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x)
            states[i] = x
        features = torch.cat([states[i] for i in wanted], dim=-1)
        return features[:, 1:] if self.cfg.select_strategy == "default" else features


class MultiModalProjector(nn.Module):
    """``linear_2(act(linear_1(features)))`` into the decoder's width."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        in_dim = cfg.hidden_size * len(cfg.feature_layers)
        self.linear_1 = nn.Linear(in_dim, cfg.out_hidden_size, bias=cfg.projector_bias)
        self.act = get_activation(cfg.projector_hidden_act)
        self.linear_2 = nn.Linear(cfg.out_hidden_size, cfg.out_hidden_size, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """The vision side: CLIP tower then projector; one row of ``pixel_values`` is one image."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = CLIPVisionTower(cfg)
        self.multi_modal_projector = MultiModalProjector(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        """The tower's layers that run (up to the last selected feature layer): the units FSDP shards
        one by one and recompute wraps. A layer after it never runs, so it stays with the root's
        parameters (gathered every step), as ``post_layernorm`` does: an FSDP unit of its own would
        never be gathered, and its backward bookkeeping would fail."""
        return self.vision_tower.encoder.layers[: max(self.cfg.feature_layers)]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, C, H, W) or flat (images, C*H*W) -> (images * tokens_per_image, text hidden)."""
        cfg = self.cfg
        images = pixel_values.reshape(-1, cfg.num_channels, cfg.image_size, cfg.image_size)
        return self.multi_modal_projector(self.vision_tower(images)).flatten(0, 1)


class LlavaModel(Qwen2_5_VLModel):
    """LLaVA for conditional generation: ``visual`` (CLIP + projector) -> ``language_model`` -> ``lm_head``.

    Takes transformers' inputs: ``input_ids`` with one ``image_token_id`` per image feature,
    ``attention_mask``, ``pixel_values`` (images, C, H, W), ``labels``; and the shared model's
    (``cu_seqlens`` packing, ``kv_cache``, ``logits_positions``, ...). Positions are 1-D.
    """

    vision_tower = LlavaVision

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)

    def scatter_vision(self, embeds, input_ids, pixel_values, image_grid_thw=None, pixel_values_videos=None,
                       video_grid_thw=None):
        """Put the images' features in place of their placeholder tokens.

        Without images the tower runs on one blank image whose features are added times zero, so
        every forward issues the same vision work (see the shared model's docstring).
        """
        if pixel_values_videos is not None:
            raise ValueError("llava takes images only, no videos")
        if pixel_values is None:
            blank = embeds.new_zeros(1, self.config.vision.patch_dim)
            return embeds + self.visual(blank).sum().to(embeds.dtype) * 0
        features = self.visual(pixel_values).to(embeds.dtype)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if n_slots != features.shape[0]:
            raise ValueError(f"{n_slots} image placeholder tokens but {features.shape[0]} image features")
        return embeds.masked_scatter(slots.unsqueeze(-1), features)
