"""3-D (temporal, height, width) M-RoPE position ids for Qwen2.5-VL and Qwen2-VL sequences.

Standalone so data collators and context-parallel sharding can compute positions before the model
runs. The result equals Hugging Face's ``Qwen2_5_VLModel.get_rope_index`` (transformers 5.x), and with
``tokens_per_second=None`` ``Qwen2VLModel.get_rope_index``.
"""

from __future__ import annotations

import itertools

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_type_ids_from_input_ids(
    input_ids: torch.Tensor, image_token_id: int, video_token_id: int
) -> torch.Tensor:
    """Per-token modality: 0 text, 1 image placeholder, 2 video placeholder (int32, like the processor)."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types = types.masked_fill(input_ids == image_token_id, IMAGE)
    return types.masked_fill(input_ids == video_token_id, VIDEO)


def _vision_positions(
    start: int, grid_t: int, grid_h: int, grid_w: int, time_interval: float | torch.Tensor
) -> torch.Tensor:
    """(3, t*h*w) positions of one image/video in merged-token units, starting at ``start``."""
    temporal = (torch.arange(grid_t) * time_interval).long() + start
    height = torch.arange(grid_h) + start
    width = torch.arange(grid_w) + start
    t, h, w = torch.meshgrid(temporal, height, width, indexing="ij")
    return torch.stack((t, h, w)).reshape(3, -1)


def get_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    second_per_grid_ts: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    spatial_merge_size: int,
    tokens_per_second: float | None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute M-RoPE position ids.

    Text runs count up by one per token. An image/video contributes a ``t x h x w`` grid (``h``, ``w``
    after spatial merging) offset by the current position: the temporal index of a video frame group
    ``i`` is ``int(i * tokens_per_second * second_per_grid_ts)`` (images use step 1), then the running
    position advances by ``max(h, w)``. Grids are consumed in order across the whole batch. Padding
    positions (``attention_mask == 0``) stay 0.

    With ``cu_seqlens`` (a packed batch of one row) every segment is numbered as if it were a row of
    its own: positions restart at 0 at each segment start, so a packed sample gets exactly the
    positions it would get alone.

    Args:
        input_ids: (batch, seq); only its shape/device/dtype are used.
        mm_token_type_ids: (batch, seq) 0 text, 1 image placeholder, 2 video placeholder.
        image_grid_thw / video_grid_thw: (n, 3) patch grids before merging, or ``None``.
        second_per_grid_ts: (n_videos,) seconds per temporal grid step; 1 when ``None``.
        attention_mask: (batch, seq) 1 real / 0 padding, or ``None``.
        spatial_merge_size: merge factor of the vision tower.
        tokens_per_second: temporal positions per second of video; ``None`` (Qwen2-VL): a video's
            temporal index counts its frame groups and ``second_per_grid_ts`` is not read.
        cu_seqlens: int ``[0, l0, l0 + l1, ..., seq]`` segment bounds of a packed row (batch 1), or
            ``None``.

    Returns:
        ``position_ids`` (3, batch, seq) with ``input_ids``' dtype and device, and ``deltas`` (batch, 1):
        ``max position + 1 - number of real tokens``, the offset generation adds to later positions
        (with ``cu_seqlens``: (segments, 1), one per segment).
    """
    if mm_token_type_ids is None:
        raise ValueError("get_rope_index needs mm_token_type_ids (0 text, 1 image, 2 video per token)")
    batch, seq = input_ids.shape
    grids = {
        IMAGE: [] if image_grid_thw is None else image_grid_thw.tolist(),
        VIDEO: [] if video_grid_thw is None else video_grid_thw.tolist(),
    }
    consumed = {IMAGE: 0, VIDEO: 0}
    # Keep seconds as 0-d tensors: the temporal scale is then computed in their dtype, rounding the
    # same way as the reference implementation.
    seconds = None if second_per_grid_ts is None else second_per_grid_ts.detach().cpu()
    type_rows = mm_token_type_ids.tolist()
    mask_rows = None if attention_mask is None else attention_mask.bool().tolist()

    # Rows to number independently: (batch row, token indices), padding left out.
    if cu_seqlens is None:
        spans = [(b, 0, seq) for b in range(batch)]
    else:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs a batch of one packed row, got batch {batch}")
        bounds = cu_seqlens.tolist()
        spans = [(0, start, end) for start, end in zip(bounds[:-1], bounds[1:])]
    rows = [
        (b, [i for i in range(start, end) if mask_rows is None or mask_rows[b][i]]) for b, start, end in spans
    ]

    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = []
    for sample, (b, keep) in enumerate(rows):
        pieces = []
        pos = 0
        for modality, run in itertools.groupby(type_rows[b][i] for i in keep):
            run_len = sum(1 for _ in run)
            if modality == TEXT:
                pieces.append(torch.arange(pos, pos + run_len).expand(3, -1))
                pos += run_len
                continue
            if modality not in (IMAGE, VIDEO):
                raise ValueError(f"unknown mm_token_type_id {modality} in sample {sample}")
            # A run may hold several adjacent images/videos; take grids until it is covered.
            while run_len > 0:
                kind = "image" if modality == IMAGE else "video"
                if consumed[modality] >= len(grids[modality]):
                    raise ValueError(f"more {kind} placeholder runs than {kind}_grid_thw entries")
                grid_t, grid_h, grid_w = grids[modality][consumed[modality]]
                grid_h //= spatial_merge_size
                grid_w //= spatial_merge_size
                if modality == VIDEO and tokens_per_second is not None:
                    step = 1 if seconds is None else seconds[consumed[modality]]
                    time_interval = tokens_per_second * step
                else:
                    time_interval = 1
                consumed[modality] += 1
                pieces.append(_vision_positions(pos, grid_t, grid_h, grid_w, time_interval))
                pos += max(grid_h, grid_w)
                run_len -= grid_t * grid_h * grid_w
                if run_len < 0:
                    raise ValueError(f"{kind} placeholder count in sample {sample} does not match {kind}_grid_thw")
        if pieces:
            positions = torch.cat(pieces, dim=1)
            position_ids[:, b, keep] = positions
            deltas.append(int(positions.max()) + 1 - len(keep))
        else:
            deltas.append(0)
    position_ids = position_ids.to(device=input_ids.device, dtype=input_ids.dtype)
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
