"""Greedy decoding for the native VLM, and prompt-only samples to decode from.

Decoding recomputes the full forward every step (no KV cache): evaluation answers are a few tokens,
so the simplicity is worth more than the speed here.

Padding: batches come right-padded from :class:`VLCollator` and stay right-padded. Each row keeps its
own length; its next token is read from the logits at its last real token and written right after
it (into padding, or a newly added column). This is exact rather than approximately right:

* causal attention means a real token never attends to anything to its right, so trailing padding
  cannot change a row's logits (padding keys are masked anyway);
* M-RoPE positions are computed inside the model from ``attention_mask`` (padding is skipped and
  real tokens count up in order), so an appended token gets the position it would have in an
  unpadded sequence.

Left padding would work too (positions skip masked tokens), but keeping the collator's layout means
the vision placeholders and ``mm_token_type_ids`` never have to move.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from openspeed.data.conversation import (
    IGNORE_INDEX,
    check_media_tags,
    encode_media,
    expand_all_media_tags,
    load_image,
)
from openspeed.data.processor import VLProcessor
from openspeed.data.prompt import normalize_prompt_messages, render_prompt
from openspeed.distributed.tensor_parallel import full_logits
from openspeed.errors import BadSampleError

# The model's forward keyword inputs that a collated batch may carry; labels and anything else the
# collator adds are left out (generation computes no loss).
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)

# A video given as a path, or as already-decoded frames with their frame rate.
VideoInput = tuple[Sequence[Image.Image], float] | str | os.PathLike


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    *,
    early_stop: bool = True,
) -> list[list[int]]:
    """Greedy-decode up to ``max_new_tokens`` tokens for every row of a right-padded prompt batch.

    Args:
        model: the native VLM (plain or FSDP-wrapped); called as ``model(**inputs).logits``. It is
            put in eval mode for the call and returned to its previous mode afterwards.
        batch: a :class:`VLCollator` batch of prompt-only samples (``input_ids``, ``attention_mask``,
            optional ``mm_token_type_ids`` and vision tensors; ``labels`` are ignored).
        max_new_tokens: the most tokens generated per row.
        eos_token_id: a row stops when it produces this id (the id is not returned).
        pad_token_id: the id written into unused positions.
        early_stop: stop as soon as every row has hit EOS. Distributed callers (FSDP) must pass
            ``False``: every rank then runs exactly ``max_new_tokens`` forwards, as the collectives
            inside the sharded forward require, whatever its own rows produced.

    Returns:
        One list of new token ids per row, without the EOS.
    """
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    bsz, seq = input_ids.shape
    if max_new_tokens <= 0 or bsz == 0:
        return [[] for _ in range(bsz)]
    device = _model_device(model)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    lengths = mask.long().sum(dim=1).tolist()
    for b, n in enumerate(lengths):
        # Right padding means the first ``n`` positions are the real ones; anything else would
        # make "append after the last real token" wrong, so refuse it rather than mis-decode.
        if n == 0 or not bool(mask[b, :n].all()):
            raise ValueError(f"row {b} of the batch is empty or not right-padded")

    # Room for every new token; columns beyond the longest row's current length are trimmed off
    # before each forward.
    width = seq + max_new_tokens
    ids = torch.full((bsz, width), pad_token_id, dtype=torch.long)
    ids[:, :seq] = input_ids.cpu()
    attn = torch.zeros((bsz, width), dtype=torch.long)
    attn[:, :seq] = mask.long().cpu()
    types = None
    if batch.get("mm_token_type_ids") is not None:
        types = torch.zeros((bsz, width), dtype=batch["mm_token_type_ids"].dtype)
        types[:, :seq] = batch["mm_token_type_ids"].cpu()
    vision = {k: batch[k].to(device) for k in _MODEL_INPUT_KEYS if batch.get(k) is not None}

    generated: list[list[int]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    rows = torch.arange(bsz)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if early_stop and all(done):
                break
            cur = max(lengths)
            inputs: dict[str, Any] = {
                "input_ids": ids[:, :cur].to(device),
                "attention_mask": attn[:, :cur].to(device),
                **vision,
            }
            if types is not None:
                inputs["mm_token_type_ids"] = types[:, :cur].to(device)
            # Vocab-sharded (tensor-parallel) logits are gathered; every TP rank decodes alike.
            logits = full_logits(model(**inputs).logits)
            last = torch.tensor(lengths) - 1
            # Only each row's last real position matters; argmax in fp32 so ties break the same way
            # whatever the compute dtype.
            next_tokens = logits[rows.to(logits.device), last.to(logits.device)].float().argmax(-1).tolist()
            for b, token in enumerate(next_tokens):
                if done[b]:
                    continue
                if token == eos_token_id:
                    done[b] = True
                    continue
                generated[b].append(int(token))
                ids[b, lengths[b]] = token
                attn[b, lengths[b]] = 1
                lengths[b] += 1  # new text token: mm_token_type_ids stays 0
    finally:
        model.train(was_training)
    return generated


def build_prompt_sample(
    processor: VLProcessor,
    messages_without_answer: list[dict[str, Any]],
    images: Sequence[Image.Image | str | os.PathLike] | None,
    videos: Sequence[VideoInput] | None = None,
    *,
    video_fps: float = 2.0,
    video_max_frames: int | None = 32,
) -> dict[str, Any]:
    """A prompt-only sample ending with ``<|im_start|>assistant\\n``, shaped like a dataset sample.

    Rendering and tag expansion are the dataset's (see :mod:`openspeed.data.prompt`), so the ids
    equal the prefix of the training sample up to the answer.

    Args:
        processor: the run's :class:`VLProcessor`.
        messages_without_answer: the conversation up to and including the last user turn
            (role/content or ShareGPT from/value), with ``<image>``/``<video>`` tags as in data files.
        images: one PIL image or path per ``<image>`` tag, in order.
        videos: one per ``<video>`` tag: a path (sampled as the dataset does, at ``video_fps`` and
            at most ``video_max_frames`` frames) or ``(frames, fps)``.

    Returns:
        ``input_ids`` (1-D long), ``labels`` (all -100), ``pixel_values``, ``image_grid_thw``,
        ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` (``None`` when absent):
        what :class:`VLCollator` takes. Raises ``BadSampleError`` for a malformed prompt or
        unusable media.
    """
    try:
        messages = normalize_prompt_messages(messages_without_answer)
    except ValueError as e:
        raise BadSampleError("malformed_record", f"prompt: {e}") from e
    images = list(images or [])
    videos = list(videos or [])
    check_media_tags(messages, len(images), len(videos), where="prompt")

    loaded_videos = [
        video if isinstance(video, tuple)
        else processor.load_video(video, fps=video_fps, max_frames=video_max_frames)
        for video in videos
    ]
    media = encode_media(processor, [load_image(im) for im in images], loaded_videos, where="prompt")
    expand_all_media_tags(messages, processor, media)

    # One tokenizer call over the whole string, as the dataset does, so ids match training exactly.
    ids = processor.tokenizer(render_prompt(messages), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": input_ids, "labels": torch.full_like(input_ids, IGNORE_INDEX), **media}
