"""Qwen2.5-VL pipeline plan: cut the model into stages, pad and stack micro-batches for the schedule.

Kept beside the model (``model.py`` has no distributed code); the schedule side is generic and lives
in :mod:`openspeed.distributed.pipeline`.

Stages
    The model is cut into ``pp * virtual_stages`` stages by decoder-layer counts. The first stage
    holds the vision tower and :meth:`Qwen2_5_VLModel.embed_inputs` (embedding, vision scatter); the
    last holds the final norm and ``lm_head``. Every stage module keeps the *original* parameter
    names (``language_model.layers.3.mlp.down_proj.weight``): the decoder layers live in a
    :class:`StageLayers` dict keyed by their index in the full model. So ``init_weights`` (seeded by
    name) gives the same values as for the full model and DCP checkpoints reshard between pipeline
    and non-pipeline layouts.

Uneven layer counts
    Counts that do not divide evenly are split as evenly as possible (sizes differ by at most one);
    no parameter-free "noop" layers are added. MindSpeed pads with noop layers because Megatron
    numbers a stage's layers as ``stage * layers_per_stage + i`` and so needs the same count on
    every stage; a noop layer costs nothing, so padding never balances work, it only satisfies that
    numbering. Here every stage owns an explicit set of layer indices and torch's schedules accept
    stages of any size, so padding would add nothing. The extra layers go to the middle stages
    first, then to the last stage, then to the first: the first stage also runs the vision tower
    (the heaviest extra), the last the vocabulary projection and the loss.

What flows between stages (fixed shapes: torch's pipelining infers them once, on the first step)
    ``hidden`` (mbs, seq, hidden) in the activation dtype, ``position_ids`` (mbs, 3, seq) int64
    M-RoPE positions and ``attention_mask`` (mbs, seq) int64. Every stage computes its rotary
    cos/sin from the positions (cheap) and turns an all-ones mask back into ``None`` as the full
    model does. The last stage returns logits (mbs, seq, vocab).

First-stage inputs
    torch's ``schedule.step`` splits every input along dim 0. Token tensors are padded to a fixed
    ``(mbs, seq_len)`` (:func:`pad_batch_to`) and concatenated; the packed vision patches, whose
    count differs per micro-batch, are zero-padded into ``(n_micro, max_patches, patch_dim)`` and
    their grids into ``(n_micro, max_grids, 3)`` with all-zero rows as padding. The stage recovers the
    real grids (rows with ``t*h*w > 0``) and the real patches (the first ``sum(t*h*w)`` rows). M-RoPE
    positions are computed while packing, on the host (as the model would, from the padded mask).

Tied embeddings
    The first stage holds ``language_model.embed_tokens``; with ``tie_word_embeddings`` the last
    stage holds its own ``language_model.embed_tokens`` too, with ``lm_head.weight`` tied to it, so
    both copies carry the same name and get the same initial value. After backward the trainer sums
    the two copies' gradients (:func:`openspeed.distributed.pipeline.sync_tied_grads`); with equal
    gradients and equal optimizer states the copies stay equal.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from openspeed.errors import ConfigError
from openspeed.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from openspeed.models.qwen2_5_vl.model import (
    IGNORE_INDEX,
    Qwen2_5_VLModel,
    causal_lm_loss,
    mrope_position_ids,
)
from openspeed.ops.attention import attention_plan

LAYERS_KEY = "parallel.pipeline_num_layers"

# Positional inputs of the first stage, in order (each stacked along dim 0 over micro-batches).
FIRST_STAGE_INPUTS = (
    "input_ids",  # (n*mbs, seq) int64
    "attention_mask",  # (n*mbs, seq) int64
    "position_ids",  # (n*mbs, 3, seq) int64
    "pixel_values",  # (n, max_patches, patch_dim), zero-padded
    "image_grid_thw",  # (n, max_images, 3), zero rows = padding
    "pixel_values_videos",  # (n, max_video_patches, patch_dim)
    "video_grid_thw",  # (n, max_videos, 3)
)


# --------------------------------------------------------------------------------------------------
# Layer split
# --------------------------------------------------------------------------------------------------


def split_layers(
    num_layers: int, num_stages: int, pipeline_num_layers: Sequence[int] | None = None
) -> list[int]:
    """Decoder layers per stage: ``pipeline_num_layers`` checked, or a balanced split.

    An explicit list needs one count per stage (``pp * virtual_stages``), summing to the model's
    ``num_hidden_layers``; the first and last stage may have 0 layers (they still run the vision
    tower / embedding and the head), a middle stage may not. The balanced split gives every stage
    ``num_layers // num_stages`` layers and the remainder one each to the middle stages, then the
    last, then the first.
    """
    if num_stages < 1:
        raise ConfigError(f"pipeline: need at least one stage, got {num_stages}")
    middle = list(range(1, num_stages - 1))
    if pipeline_num_layers is not None:
        counts = list(pipeline_num_layers)
        if len(counts) != num_stages:
            raise ConfigError(
                f"{LAYERS_KEY}: {len(counts)} entries {counts}, need one per pipeline stage "
                f"(pp*virtual_stages = {num_stages})"
            )
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ConfigError(f"{LAYERS_KEY}: {counts} must be non-negative integers")
        if sum(counts) != num_layers:
            raise ConfigError(
                f"{LAYERS_KEY}: {counts} sums to {sum(counts)} layers, the model has {num_layers} "
                "(num_hidden_layers)"
            )
        empty = [i for i in middle if counts[i] == 0]
        if empty:
            raise ConfigError(f"{LAYERS_KEY}: {counts} leaves middle stage {empty[0]} without layers")
        return counts
    if num_layers < len(middle):
        raise ConfigError(
            f"parallel.pp*virtual_stages: {num_stages} stages need at least {len(middle)} decoder "
            f"layers, the model has {num_layers}"
        )
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    order = middle + ([num_stages - 1] if num_stages > 1 else []) + [0]
    for stage in order[:extra]:
        counts[stage] += 1
    return counts


def layer_ranges(counts: Sequence[int]) -> list[range]:
    """The decoder-layer indices (in the full model) of each stage."""
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


# --------------------------------------------------------------------------------------------------
# Stage modules
# --------------------------------------------------------------------------------------------------


class StageLayers(nn.ModuleDict):
    """The decoder layers a stage owns, keyed by their index in the full model.

    Registered names are the original indices (``layers.3.…``), so parameter names match the full
    model. Unlike a plain ``ModuleDict``, iterating yields the layers (in index order), as iterating
    the full model's ``ModuleList`` does; ``items()`` gives ``(index string, layer)``; indexing takes
    the original index (``layers[3]``).
    """

    def __iter__(self) -> Iterator[nn.Module]:  # type: ignore[override]
        return iter(self._modules.values())

    def __getitem__(self, key: int | str) -> nn.Module:
        return self._modules[str(key)]


class _TextStage(nn.Module):
    """The part of ``language_model`` one stage holds (same attribute names as the full one)."""

    def __init__(self, text: nn.Module, layer_ids: range, embed: bool, norm: bool) -> None:
        super().__init__()
        self.cfg = text.cfg
        if embed:
            self.embed_tokens = copy.deepcopy(text.embed_tokens)
        self.layers = StageLayers({str(i): copy.deepcopy(text.layers[i]) for i in layer_ids})
        if norm:
            self.norm = copy.deepcopy(text.norm)
        # Parameter-free (a non-persistent buffer): every stage computes its own cos/sin.
        self.rotary_emb = copy.deepcopy(text.rotary_emb)


def _unstack_vision(
    pixels: torch.Tensor, grids: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One micro-batch's real patches and grids from its zero-padded (1, P, D) / (1, G, 3) slices."""
    if grids.shape[1] == 0:
        return None, None
    grid = grids[0]
    sizes = grid.prod(-1)
    grid = grid[sizes > 0]
    if grid.shape[0] == 0:
        return None, None
    return pixels[0, : int(sizes.sum())], grid


class Qwen2_5_VLStage(nn.Module):
    """One pipeline stage of Qwen2.5-VL, holding only its own parts under their full-model names.

    Attributes that exist depend on the stage: ``visual`` and ``language_model.embed_tokens`` on the
    first, ``language_model.norm`` and ``lm_head`` on the last (plus ``language_model.embed_tokens``,
    tied to ``lm_head``, with tied embeddings), ``language_model.layers`` (a :class:`StageLayers`)
    and ``language_model.rotary_emb`` everywhere.

    ``forward``: the first stage takes :data:`FIRST_STAGE_INPUTS` (one micro-batch's slice), other
    stages ``(hidden, position_ids, attention_mask)``; non-last stages return that triple, the last
    returns logits.
    """

    def __init__(self, model: Qwen2_5_VLModel, stage_index: int, num_stages: int, layer_ids: range) -> None:
        super().__init__()
        # The first stage embeds exactly as the full model does: its class's code runs on this module
        # (the attribute names it reads, ``config``/``visual``/``language_model.embed_tokens``, are
        # the same), whichever family's model it is (LLaVA scatters its images its own way).
        self._model_class = type(model)
        self.config = model.config
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.tie_word_embeddings = bool(model.config.tie_word_embeddings)
        self.layer_ids = layer_ids
        if self.is_first:
            self.visual = copy.deepcopy(model.visual)
        self.language_model = _TextStage(
            model.language_model,
            layer_ids,
            embed=self.is_first or (self.is_last and self.tie_word_embeddings),
            norm=self.is_last,
        )
        if self.is_last:
            self.lm_head = copy.deepcopy(model.lm_head)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Point ``lm_head.weight`` at this stage's embedding (last stage, tied embeddings only).

        Called again by ``reset_non_persistent_buffers`` after ``to_empty``.
        """
        if self.is_last and self.tie_word_embeddings:
            embed = self.language_model.embed_tokens.weight
            if self.lm_head.weight is not embed:
                self.lm_head.weight = embed

    def embed_inputs(self, *args, **kwargs):
        return self._model_class.embed_inputs(self, *args, **kwargs)

    def scatter_vision(self, *args, **kwargs):
        return self._model_class.scatter_vision(self, *args, **kwargs)

    def fsdp_blocks(self) -> list[nn.Module]:
        """The units to shard one by one (this stage's vision and decoder blocks); the rest stays in the root."""
        blocks = list(self.visual.blocks) if self.is_first else []
        return blocks + list(self.language_model.layers)

    def tied_parameters(self) -> list[nn.Parameter]:
        """The copies of the tied embedding this stage holds (empty without tied embeddings)."""
        if self.tie_word_embeddings and (self.is_first or self.is_last):
            return [self.language_model.embed_tokens.weight]
        return []

    def forward(self, *args: torch.Tensor):
        if self.is_first:
            input_ids, attention_mask, position_ids, pixels, grids, video_pixels, video_grids = args
            pixel_values, image_grid_thw = _unstack_vision(pixels, grids)
            pixel_values_videos, video_grid_thw = _unstack_vision(video_pixels, video_grids)
            hidden, _, _ = self.embed_inputs(
                input_ids,
                attention_mask,
                pixel_values,
                image_grid_thw,
                pixel_values_videos,
                video_grid_thw,
                position_ids=position_ids.transpose(0, 1),
            )
        else:
            hidden, position_ids, attention_mask = args
        text = self.language_model
        if len(text.layers):
            cos, sin = text.rotary_emb(position_ids.transpose(0, 1), hidden.dtype)
            # As in the full model: an all-ones mask is dropped so SDPA may use its causal kernels.
            mask = None if bool(attention_mask.all()) else attention_mask
            plan = attention_plan(attention_mask=mask)  # one for the stage's layers
            for layer in text.layers:
                hidden = layer(hidden, cos, sin, mask, plan=plan)
        if self.is_last:
            return self.lm_head(text.norm(hidden))
        return hidden, position_ids, attention_mask


def build_stage_modules(
    model: Qwen2_5_VLModel,
    stage_indices: Sequence[int],
    num_stages: int,
    pipeline_num_layers: Sequence[int] | None = None,
) -> list[Qwen2_5_VLStage]:
    """This rank's stage modules (in ``stage_indices`` order), cut out of ``model``.

    ``model`` is normally built on the meta device (then this is free); the stages deep-copy the
    parts they own, so a materialised model's values carry over and ``model`` is left intact.
    Apply FSDP (``apply_fsdp(stage, dp_mesh, stage.fsdp_blocks())``), ``to_empty``,
    ``reset_non_persistent_buffers`` and ``init_weights`` to each stage as to a full model.
    """
    counts = split_layers(model.config.text.num_hidden_layers, num_stages, pipeline_num_layers)
    ranges = layer_ranges(counts)
    return [Qwen2_5_VLStage(model, s, num_stages, ranges[s]) for s in stage_indices]


def stage_modules_for_rank(model: Qwen2_5_VLModel, dims, parallel) -> list[Qwen2_5_VLStage]:
    """This rank's stage modules for the run's ``ParallelConfig`` (``pp`` from the mesh's ``pp`` dim).

    Placement follows the schedule (round-robin, or V-shaped for ``dualpipev`` and two-stage
    ``zero_bubble``); see :func:`openspeed.distributed.pipeline.local_stage_indices`.
    """
    from openspeed.distributed.pipeline import local_stage_indices

    pp = dims.sizes["pp"]
    indices = local_stage_indices(
        dims.mesh["pp"].get_local_rank(), pp, parallel.virtual_stages, parallel.pp_schedule
    )
    return build_stage_modules(model, indices, pp * parallel.virtual_stages, parallel.pipeline_num_layers)


# --------------------------------------------------------------------------------------------------
# Micro-batch padding and packing
# --------------------------------------------------------------------------------------------------

_PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0, "position_ids": 0}


def pad_batch_to(
    batch: dict[str, Any], seq_len: int, pad_token_id: int, batch_size: int | None = None
) -> dict[str, Any]:
    """Right-pad a collated batch's token tensors to ``seq_len`` columns (and ``batch_size`` rows).

    Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0), ``labels`` (-100),
    ``mm_token_type_ids`` (0) and ``position_ids`` ((batch, seq) or (3, batch, seq); 0). Extra rows
    (a micro-batch that lost samples) are all padding: fully masked, no labels, no vision tokens, so
    they add nothing to the loss or the gradients. Vision tensors are left as they are. A batch
    without ``attention_mask`` gets one (ones over its real columns).
    """
    out = dict(batch)
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    if length > seq_len:
        raise ValueError(f"batch of {length} tokens is longer than the pipeline sequence length {seq_len}")
    if batch_size is not None and rows > batch_size:
        raise ValueError(f"batch of {rows} rows is larger than the micro-batch size {batch_size}")
    add_cols = seq_len - length
    add_rows = 0 if batch_size is None else batch_size - rows
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(input_ids)
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "position_ids"):
        value = out.get(key)
        if value is None or (add_cols == 0 and add_rows == 0):
            continue
        fill = pad_token_id if key == "input_ids" else _PAD_VALUES[key]
        # The batch dim is the second-to-last one for every key ((3, batch, seq) positions too).
        out[key] = F.pad(value, (0, add_cols, 0, add_rows), value=fill)
    return out


def _positions(batch: dict[str, Any], config: Qwen2_5_VLConfig) -> torch.Tensor:
    """(3, batch, seq) M-RoPE positions, computed exactly as ``embed_inputs`` would."""
    position_ids = mrope_position_ids(
        config,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch.get("second_per_grid_ts"),
        batch.get("mm_token_type_ids"),
        batch.get("position_ids"),
    )
    return position_ids.long()


def _stack_ragged(parts: list[torch.Tensor | None], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Zero-pad 2-D tensors of different lengths into one (len(parts), max_len, width) tensor."""
    longest = max((p.shape[0] for p in parts if p is not None), default=0)
    out = torch.zeros(len(parts), longest, width, dtype=dtype)
    for i, p in enumerate(parts):
        if p is not None:
            out[i, : p.shape[0]] = p.to("cpu", dtype)
    return out


def pack_microbatches(
    batches: Sequence[dict[str, Any]],
    config: Qwen2_5_VLConfig,
    seq_len: int | None = None,
    pad_token_id: int = 0,
    batch_size: int | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Micro-batch dicts -> the first stage's inputs stacked along dim 0, and the stacked labels.

    Each micro-batch is padded to ``seq_len`` columns (default: the longest among them) and
    ``batch_size`` rows (default: unchanged, then all must have the same rows). Returns
    ``(args, labels)`` on the CPU: ``args`` in :data:`FIRST_STAGE_INPUTS` order, so that
    ``schedule.step(*args, target=labels)`` hands micro-batch ``i`` exactly its own slice;
    ``labels`` is ``None`` when the batches have none.
    """
    if not batches:
        raise ValueError("no micro-batches to pack")
    if seq_len is None:
        seq_len = max(int(b["input_ids"].shape[1]) for b in batches)
    padded = [
        pad_batch_to(
            {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()},
            seq_len,
            pad_token_id,
            batch_size,
        )
        for b in batches
    ]
    rows = {int(b["input_ids"].shape[0]) for b in padded}
    if len(rows) != 1:
        raise ValueError(f"micro-batches have different numbers of rows {sorted(rows)}; pass batch_size")
    patch_dim = config.vision.patch_dim
    pixel_dtype = next(
        (b[k].dtype for b in padded for k in ("pixel_values", "pixel_values_videos") if b.get(k) is not None),
        torch.float32,
    )
    args = (
        torch.cat([b["input_ids"].long() for b in padded]),
        torch.cat([b["attention_mask"].long() for b in padded]),
        torch.cat([_positions(b, config).transpose(0, 1) for b in padded]).contiguous(),
        _stack_ragged([b.get("pixel_values") for b in padded], patch_dim, pixel_dtype),
        _stack_ragged([b.get("image_grid_thw") for b in padded], 3, torch.long),
        _stack_ragged([b.get("pixel_values_videos") for b in padded], patch_dim, pixel_dtype),
        _stack_ragged([b.get("video_grid_thw") for b in padded], 3, torch.long),
    )
    has_labels = [b.get("labels") is not None for b in padded]
    if any(has_labels) and not all(has_labels):
        raise ValueError("some micro-batches have labels and some do not")
    labels = torch.cat([b["labels"].long() for b in padded]) if all(has_labels) else None
    return args, labels


class Qwen2_5_VLPipelinePacker:
    """Callable the generic pipeline runner uses to turn micro-batch dicts into stage inputs.

    ``packer(batches)`` pads to the run's fixed ``(micro_batch_size, seq_len)`` (what training under
    a schedule needs); ``packer.for_inference(batch)`` keeps the batch's own shape (the explicit
    send/recv forward transfers shapes).
    """

    def __init__(
        self, config: Qwen2_5_VLConfig, seq_len: int, pad_token_id: int, micro_batch_size: int
    ) -> None:
        self.config = config
        self.seq_len = seq_len
        self.pad_token_id = pad_token_id
        self.micro_batch_size = micro_batch_size

    def __call__(
        self, batches: Sequence[dict[str, Any]]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        return pack_microbatches(batches, self.config, self.seq_len, self.pad_token_id, self.micro_batch_size)

    def for_inference(self, batch: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        return pack_microbatches([batch], self.config, None, self.pad_token_id, None)


def stage_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor) -> torch.Tensor:
    """The last stage's loss: summed token cross-entropy / ``num_items`` (the global target count)."""
    return causal_lm_loss(logits, labels, num_items)


__all__ = [
    "FIRST_STAGE_INPUTS",
    "Qwen2_5_VLPipelinePacker",
    "Qwen2_5_VLStage",
    "StageLayers",
    "build_stage_modules",
    "layer_ranges",
    "pack_microbatches",
    "pad_batch_to",
    "split_layers",
    "stage_loss",
    "stage_modules_for_rank",
]
