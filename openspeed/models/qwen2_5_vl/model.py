"""Native Qwen2.5-VL: a windowed ViT vision tower, a patch merger and a Qwen2 decoder with M-RoPE.

Plain PyTorch, no distributed code. Parameter names follow the Hugging Face module tree below
``model.`` so checkpoint conversion is a prefix rename (see ``convert.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openspeed.models.layers.decoder import LanguageModel
from openspeed.models.layers.kv_cache import KVCache
from openspeed.models.layers.mlp import SwiGLUMLP
from openspeed.models.layers.norms import RMSNorm
from openspeed.models.layers.rope import (
    VisionRotaryEmbedding,
    apply_vision_rotary,
)
from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig
from openspeed.models.qwen2_5_vl.rope_index import get_rope_index, mm_token_type_ids_from_input_ids
from openspeed.ops.attention import AttentionPlan, attention, attention_plan
from openspeed.ops.cross_entropy import can_fuse, fused_linear_cross_entropy
from openspeed.ops.level import chunked_loss

IGNORE_INDEX = -100
VISION_NORM_EPS = 1e-6  # fixed in the released checkpoints, not part of the config


# --------------------------------------------------------------------------------------------------
# Vision-side index bookkeeping (pure functions of the grids, no weights)
# --------------------------------------------------------------------------------------------------


def vision_rotary_positions(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(num_patches, 2) row/column of every patch, in the processor's patch order.

    Patches arrive grouped by ``merge x merge`` block (block rows, block columns, then the rows and
    columns inside a block), frame after frame.
    """
    m = spatial_merge_size
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, -1, -1)
        # (block_row, in_row, block_col, in_col) -> (block_row, block_col, in_row, in_col)
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def vision_frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """int32 cumulative lengths with one segment per frame (``h*w`` patches): full-attention blocks."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def vision_window_index(
    grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group merged tokens into square windows of ``window_size`` pixels.

    Returns ``window_index`` (num_merged_tokens,): the merged-token order that makes every window
    contiguous (windows in row-major order per frame, tokens row-major inside a window), and
    ``cu_window_seqlens`` (int32, in patch units): the window boundaries in that order. Windows at the
    right/bottom edge may be partial.
    """
    m = spatial_merge_size
    side = window_size // m // patch_size  # window side in merged tokens
    order, lengths = [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        n_wh, n_ww = -(-gh // side), -(-gw // side)
        frame = torch.arange(t).view(t, 1, 1)
        win_row = (torch.arange(gh) // side).view(1, gh, 1)
        win_col = (torch.arange(gw) // side).view(1, 1, gw)
        window_id = ((frame * n_wh + win_row) * n_ww + win_col).reshape(-1)
        # A stable sort keeps the row-major order of tokens inside each window.
        order.append(torch.sort(window_id, stable=True).indices + offset)
        lengths.append(torch.bincount(window_id, minlength=t * n_wh * n_ww))
        offset += t * gh * gw
    window_index = torch.cat(order).to(grid_thw.device)
    lengths = torch.cat(lengths) * (m * m)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return window_index, cu.unique_consecutive().to(grid_thw.device)


# --------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """3-D patch embedding: one ``temporal_patch x patch x patch`` cube per row of ``pixel_values``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_patches, C*T*P*P) -> (num_patches, hidden)."""
        weight = self.proj.weight
        # Kernel == stride == input cube, so the convolution is exactly a matmul with the flattened
        # kernel; the matmul avoids the very slow Conv3d kernels some backends pick for this shape.
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1))


class VisionAttention(nn.Module):
    """Multi-head self-attention over packed patches, restricted to ``cu_seqlens`` segments."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:
        """``x``: (num_patches, hidden); ``plan``: the tower's plan for ``cu_seqlens`` (else one per call)."""
        n = x.shape[0]
        # -1, not num_heads: a tensor-parallel rank holds only its heads (its [q; k; v] rows).
        q, k, v = self.qkv(x).view(n, 3, -1, self.head_dim).unbind(1)
        q, k = apply_vision_rotary(q, k, cos, sin)
        # (N, heads, dim) -> (1, heads, N, dim): one packed "batch" split by cu_seqlens.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if plan is None:
            plan = attention_plan(cu_seqlens=cu_seqlens)
        out = attention(q, k, v, causal=False, scale=self.head_dim**-0.5, plan=plan)
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


def vision_swiglu(cfg: VisionConfig) -> nn.Module:
    """The vision blocks' MLP: SwiGLU with biases."""
    return SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, bias=True, act=cfg.hidden_act)


class VisionBlock(nn.Module):
    """Pre-norm transformer block of the vision tower.

    ``norm_layer`` (``(dim, eps=)``) and ``mlp_layer`` (``(cfg)``) build its norms and MLP: Qwen2-VL's block
    swaps them for LayerNorm and a two-layer MLP.
    """

    norm_layer = RMSNorm
    mlp_layer = staticmethod(vision_swiglu)

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = self.norm_layer(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = self.norm_layer(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.mlp = self.mlp_layer(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        plan: AttentionPlan | None = None,
    ) -> torch.Tensor:
        """``x``: (num_patches, hidden); ``cu_seqlens`` and ``plan`` as in :class:`VisionAttention`."""
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, plan=plan)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Normalise, concatenate each ``merge x merge`` block of patches and project to the text width
    (``norm_layer``: RMSNorm here, LayerNorm in Qwen2-VL's merger)."""

    norm_layer = RMSNorm

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = self.norm_layer(cfg.hidden_size, eps=VISION_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, cfg.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(num_patches, hidden) -> (num_patches / merge^2, out_hidden)."""
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTransformer(nn.Module):
    """Qwen2.5-VL vision tower: window attention, with full attention in ``fullatt_block_indexes``.

    ``block`` and ``merger_cls`` are the classes it is built of (Qwen2-VL's tower swaps them).
    """

    block: type[nn.Module] = VisionBlock
    merger_cls: type[nn.Module] = PatchMerger

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary_pos_emb = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(self.block(cfg) for _ in range(cfg.depth))
        self.merger = self.merger_cls(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode packed patches of all images/videos in ``grid_thw`` order.

        Args:
            pixel_values: (sum t*h*w, C*T*P*P), patches in the processor's merge-block order.
            grid_thw: (n, 3) patch grid of each image/video.

        Returns:
            (sum t*h*w / merge^2, out_hidden): one embedding per merged token, in input order.
        """
        cfg = self.cfg
        unit = cfg.spatial_merge_size**2
        grid_cpu = grid_thw.cpu()
        window_index, cu_windows = vision_window_index(
            grid_cpu, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        cu_frames = vision_frame_cu_seqlens(grid_cpu)
        positions = vision_rotary_positions(grid_cpu, cfg.spatial_merge_size)
        window_index = window_index.to(pixel_values.device)

        def to_window_order(t: torch.Tensor) -> torch.Tensor:
            # Reorder whole merge blocks so each window is contiguous; merge blocks never straddle windows.
            return t.view(-1, unit, t.shape[-1])[window_index].view(-1, t.shape[-1])

        x = to_window_order(self.patch_embed(pixel_values))
        cos, sin = self.rotary_pos_emb(positions.to(pixel_values.device))
        cos, sin = to_window_order(cos), to_window_order(sin)

        # One attention plan per segmentation (read on the host once, here CPU tensors: no sync), shared
        # by every block that uses it.
        frame_plan, window_plan = attention_plan(cu_seqlens=cu_frames), attention_plan(cu_seqlens=cu_windows)
        for i, block in enumerate(self.blocks):
            full = i in cfg.fullatt_block_indexes
            cu_seqlens, plan = (cu_frames, frame_plan) if full else (cu_windows, window_plan)
            x = block(x, cos, sin, cu_seqlens, plan=plan)

        merged = self.merger(x)
        inverse = torch.empty_like(window_index)
        inverse[window_index] = torch.arange(window_index.numel(), device=window_index.device)
        return merged[inverse]


# --------------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------------


def segment_positions(cu_seqlens: torch.Tensor, seq: int) -> torch.Tensor:
    """(seq,) long positions that count from 0 inside every ``cu_seqlens`` segment (on the CPU)."""
    bounds = cu_seqlens.detach().to("cpu", torch.long)
    lengths = bounds[1:] - bounds[:-1]
    if int(bounds[0]) != 0 or int(bounds[-1]) != seq:
        raise ValueError(f"cu_seqlens must run from 0 to seq ({seq}), got {int(bounds[0])}..{int(bounds[-1])}")
    return torch.arange(seq) - torch.repeat_interleave(bounds[:-1], lengths)


def mrope_position_ids(
    cfg: Qwen2_5_VLConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """(3, batch, seq) positions: the given ones (2-D ones repeated), 3-D M-RoPE when a grid is
    given and the family numbers its vision tokens in 3-D (``cfg.ROPE_3D``; LLaVA does not), else
    ``0..seq-1`` counted over the real tokens of
    ``attention_mask``. With ``cu_seqlens`` (a packed row) the computed positions restart at every
    segment, as if each segment were a row of its own."""
    if position_ids is None:
        if cfg.ROPE_3D and (image_grid_thw is not None or video_grid_thw is not None):
            if mm_token_type_ids is None:
                mm_token_type_ids = mm_token_type_ids_from_input_ids(
                    input_ids, cfg.image_token_id, cfg.video_token_id
                )
            position_ids, _ = get_rope_index(
                input_ids,
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                second_per_grid_ts,
                attention_mask,
                cfg.vision.spatial_merge_size,
                cfg.vision.tokens_per_second,
                cu_seqlens=cu_seqlens,
            )
        elif cu_seqlens is not None:
            position_ids = segment_positions(cu_seqlens, input_ids.shape[1]).to(input_ids.device)[None]
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.expand(input_ids.shape[0], -1)
            if attention_mask is not None:
                # Real tokens count up in order, padding skipped: a left-padded row numbers its tokens
                # from 0 as it would unpadded. Padding keeps its column index (no real token sees it),
                # so right-padded rows get exactly 0..seq-1.
                real = attention_mask.bool()
                position_ids = torch.where(real, attention_mask.long().cumsum(1) - 1, position_ids)
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    return position_ids


def _attention_mask_needed(
    attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> torch.Tensor | None:
    """``attention_mask`` if the text attention must apply it, else ``None``.

    Without padding the mask is pure overhead, and an explicit mask keeps SDPA off its fused causal
    kernels (and flash-attn's varlen path off its no-copy layout); one host sync is far cheaper than
    that. In a packed row, padding that fills whole segments (the collator's trailing run) is never
    seen by a real token either, so the mask is dropped too; padding inside a sample's segment keeps it.
    """
    if attention_mask is None:
        return None
    if cu_seqlens is None:
        return None if bool(attention_mask.all()) else attention_mask
    mask = attention_mask.detach().to("cpu", torch.bool)[0]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        segment = mask[start:end]
        if end > start and bool(segment.any()) and not bool(segment.all()):
            return attention_mask
    return None


def next_text_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch,) the M-RoPE position a text token appended after each row's real tokens would take.

    :func:`get_rope_index` advances its running position by ``max(h, w)`` after an image or video
    (whose height/width positions reach ``start + max(h, w) - 1``) and by one per text token, so the
    next position is one more than the largest height/width position of the row's real tokens. (The
    temporal section can run further ahead for long videos, which is why Hugging Face's "max + 1"
    ``rope_deltas`` are not used here: this matches what a full forward over the longer row computes.)
    """
    spatial = position_ids[1:].amax(0)  # (batch, seq); text tokens hold one value in all sections
    if attention_mask is not None:
        spatial = spatial.masked_fill(~attention_mask.to(spatial.device, torch.bool), -1)
    return spatial.amax(1) + 1


def decode_position_ids(
    kv_cache: KVCache, attention_mask: torch.Tensor | None, batch: int, new: int, device: torch.device
) -> torch.Tensor:
    """(3, batch, new) positions of ``new`` appended text tokens, advancing ``kv_cache.next_positions``.

    ``attention_mask`` covers the cached and the new tokens; new tokens that are padding (a row that
    has finished) take no position.
    """
    if kv_cache.next_positions is None:
        raise ValueError("the KV cache has no positions: run the prompt through the model with it first")
    if attention_mask is None:
        new_mask = torch.ones(batch, new, dtype=torch.long, device=device)
    else:
        new_mask = attention_mask[:, -new:].to(device, torch.long)
    start = kv_cache.next_positions.to(device)
    positions = start[:, None] + new_mask.cumsum(1) - new_mask  # real new tokens count up from start
    kv_cache.next_positions = start + new_mask.sum(1)
    return positions.unsqueeze(0).expand(3, -1, -1)


@dataclass
class CausalLMOutput:
    """Model output: ``logits`` (batch, seq, vocab) and ``loss`` (scalar fp32, or ``None`` without labels).

    ``logits`` is ``None`` when the caller asked for the loss only (``return_logits=False``) and it was
    computed from the hidden states in chunks (optimization level 2): the full logits never exist.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The target of every position: ``labels`` (aligned to the inputs) shifted left by one, -100 last.

    With ``cu_seqlens`` (a packed row) the last position of every segment gets -100 too, so no
    sample's last token is asked to predict the next sample's first one.
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.long) - 1
        targets[..., ends[ends >= 0]] = IGNORE_INDEX  # a view of F.pad's fresh tensor: labels stay intact
    return targets


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy in fp32 of ``logits`` against per-position ``targets`` (-100 = ignore), no shift.

    The mean over target tokens, or, with ``num_items_in_batch``, the sum divided by it (so that
    summing micro-batch / rank losses gives the exact global mean).
    """
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.to(logits.device).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy in fp32 with ``labels`` aligned to the inputs (shifted here).

    Returns the mean over label tokens, or, when ``num_items_in_batch`` is given, the sum divided by it
    (so that summing micro-batch/rank losses gives the exact global mean). With ``cu_seqlens`` (a
    packed row) the first token of every segment is never a target: no sample's last token is asked
    to predict the next sample's first one.
    """
    return token_loss(logits, next_token_targets(labels, cu_seqlens), num_items_in_batch)


class Qwen2_5_VLModel(nn.Module):
    """Qwen2.5-VL for conditional generation: ``visual`` -> ``language_model`` -> ``lm_head``.

    ``vision_tower`` is the class built from ``config.vision``: Qwen2-VL's model is this one with
    its own tower.
    """

    vision_tower: type[nn.Module] = VisionTransformer

    def __init__(self, config: Qwen2_5_VLConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = self.vision_tower(config.vision)
        self.language_model = LanguageModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with the input embedding when the config asks for tied embeddings.

        ``to_empty`` and ``load_state_dict(assign=True)`` replace parameters one by one and so break
        the sharing; call this again after them.
        """
        embed = self.language_model.embed_tokens.weight
        # Only re-point when the sharing is actually broken, so an intact tie (e.g. one a parallel
        # wrapper already manages) is left alone.
        if self.config.tie_word_embeddings and self.lm_head.weight is not embed:
            self.lm_head.weight = embed

    def new_kv_cache(self, capacity: int = 0) -> KVCache:
        """An empty :class:`KVCache` for this model, with room for ``capacity`` tokens per row."""
        return KVCache(self.config.text.num_hidden_layers, capacity)

    def scatter_vision(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
    ) -> torch.Tensor:
        """Put the vision features of the batch's images and videos in place of their pad tokens.

        The tower runs exactly once per call, on the images and videos together (its attention
        stays inside each image / frame / window, so this equals encoding them apart), and also
        when the batch has neither: then on one blank merge block whose features are added times
        zero. So every forward issues the same vision-tower work whatever its data holds: the
        collectives of a sharded tower (one data-parallel rank text-only, another with a video)
        always match, and the tower's gradient from such a batch is exactly zero.
        """
        media = []
        for kind, pixels, grid, token_id in (
            ("image", pixel_values, image_grid_thw, self.config.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels were given without {kind}_grid_thw")
            media.append((kind, pixels, grid, token_id))
        if not media:
            vision = self.config.vision
            m = vision.spatial_merge_size
            blank = embeds.new_zeros(m * m, vision.patch_dim)
            grid = torch.tensor([[1, m, m]], device=input_ids.device)
            return embeds + self.visual(blank, grid).sum().to(embeds.dtype) * 0
        features = self.visual(torch.cat([p for _, p, _, _ in media]), torch.cat([g for _, _, g, _ in media]))
        features = features.to(embeds.dtype)
        unit = self.config.vision.spatial_merge_size**2
        start = 0
        for kind, _, grid, token_id in media:
            count = int(grid.prod(-1).sum()) // unit
            slots = input_ids == token_id
            n_slots = int(slots.sum())
            if n_slots != count:
                raise ValueError(f"{n_slots} {kind} placeholder tokens but {count} {kind} features")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features[start : start + count])
            start += count
        return embeds

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the vision features in place, (3, batch, seq) positions and the mask.

        The first half of :meth:`forward`; pipeline stages call it on the first stage only.
        The returned mask is ``None`` when the attention needs none: no padding, or, for a packed row
        (``cu_seqlens``), padding only in segments of its own (which real tokens never see).
        """
        cfg = self.config
        embeds = self.language_model.embed_tokens(input_ids)
        embeds = self.scatter_vision(
            embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )

        position_ids = mrope_position_ids(
            cfg, input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
            mm_token_type_ids, position_ids, cu_seqlens,
        )
        return embeds, position_ids, _attention_mask_needed(attention_mask, cu_seqlens)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        return_logits: bool = True,
        kv_cache: KVCache | None = None,
        logits_positions: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Run the model on a (batch, seq) batch.

        Image/video features replace the embeddings of the image/video pad tokens. Without
        ``position_ids``, 3-D M-RoPE positions are computed when a grid is given (see
        :func:`get_rope_index`), else positions are ``0..seq-1``. ``position_ids`` may be given as
        (batch, seq) or (3, batch, seq). With ``labels`` (aligned to ``input_ids``, -100 = ignore) the
        causal LM loss is returned too (see :func:`causal_lm_loss`).

        ``cu_seqlens`` (int ``[0, l0, l0 + l1, ..., seq]``) marks a packed row (batch 1) of several
        samples, as :class:`~openspeed.data.collator.VLCollator` builds with ``packing=True``: each
        segment is computed exactly as if it were a row of its own in a padded batch (attention
        inside the segment, M-RoPE positions from 0, no target across a boundary).

        ``shift_labels`` instead of ``labels``: the targets already shifted (position ``i`` holds the
        token that should follow it, see :func:`next_token_targets`), aligned with the logits this
        forward returns. Context parallelism uses it: the shift crosses the boundaries between the
        ranks' token shards, so it is done on the whole sequence before the split.

        ``return_logits=False`` (with labels) says only the loss is wanted: from optimization level 2
        on it is then computed from the final hidden states in chunks and ``logits`` is ``None``.

        ``kv_cache`` (:meth:`new_kv_cache`) makes the forward incremental, for decoding. Given empty,
        this is the prompt ("prefill"): computed as without a cache, and the cache keeps every layer's
        keys/values and each row's next text position. Given filled, ``input_ids`` is one new text
        token per row (batch, 1), ``attention_mask`` covers the cached tokens and the new one (0 for a
        row that has finished), no vision inputs are taken (the vision tower runs on the prefill only),
        and the new token's M-RoPE position continues its row's real tokens.

        ``logits_positions`` (batch,): one position per row whose logits alone are returned, as
        (batch, 1, vocab), without labels. What a prompt pass of decoding needs: each row's last real
        token, without forming (batch, seq, vocab) logits. Hidden states must be whole sequences
        here (not under sequence parallelism).
        """
        if cu_seqlens is not None:
            if kv_cache is not None:
                raise ValueError("a KV cache takes padded batches, not packed rows (cu_seqlens)")
            # Read on the host once per forward (one sync at most), not once per layer.
            cu_seqlens = cu_seqlens.detach().cpu()
        if kv_cache is not None and len(kv_cache) > 0:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError("decode steps with a filled KV cache take text tokens only, no pixels")
            embeds = self.language_model.embed_tokens(input_ids)
            if position_ids is None:
                position_ids = decode_position_ids(
                    kv_cache, attention_mask, input_ids.shape[0], input_ids.shape[1], input_ids.device
                )
            elif position_ids.dim() == 2:
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
            # The mask as given, not checked for padding: that would read it on the host every step, and
            # a single query per row gains nothing from a mask-free kernel.
            text_mask = attention_mask
        else:
            embeds, position_ids, text_mask = self.embed_inputs(
                input_ids,
                attention_mask,
                pixel_values,
                image_grid_thw,
                pixel_values_videos,
                video_grid_thw,
                second_per_grid_ts,
                mm_token_type_ids,
                position_ids,
                cu_seqlens,
            )
            if kv_cache is not None:
                kv_cache.next_positions = next_text_positions(position_ids, attention_mask)
        hidden = self.language_model(embeds, position_ids, text_mask, cu_seqlens, kv_cache=kv_cache)
        wants_loss = labels is not None or shift_labels is not None
        if wants_loss and not return_logits and chunked_loss() and can_fuse(self.lm_head.weight):
            targets = shift_labels if shift_labels is not None else next_token_targets(labels, cu_seqlens)
            loss = fused_linear_cross_entropy(
                hidden, self.lm_head.weight, targets, divisor=num_items_in_batch
            )
            return CausalLMOutput(logits=None, loss=loss)
        if logits_positions is not None:
            if wants_loss:
                raise ValueError("logits_positions selects logits for decoding; it takes no labels")
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden = hidden[rows, logits_positions.to(hidden.device)].unsqueeze(1)
        logits = self.lm_head(hidden)
        loss = None
        if shift_labels is not None:
            loss = token_loss(logits, shift_labels, num_items_in_batch)
        elif labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, cu_seqlens)
        return CausalLMOutput(logits=logits, loss=loss)


def reset_non_persistent_buffers(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Refill every non-persistent buffer (rotary ``inv_freq``) and re-tie shared weights.

    Call after ``model.to_empty(device=...)`` (or after loading with ``assign=True`` into a ``meta``
    model). ``device`` defaults to the device of the model's first parameter.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None and not first.is_meta else torch.device("cpu")
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset(device)
    for module in model.modules():
        tie = getattr(module, "tie_weights", None)
        if callable(tie):
            tie()
