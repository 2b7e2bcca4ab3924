"""Batched decoding for the native VLM (greedy or sampled), and prompt-only samples to decode from.

:func:`generate` decodes with a KV cache when the model offers one (``model.new_kv_cache``, the
native Qwen2.5-VL does) and otherwise recomputes the full forward every step (e.g. the pipeline-stage
front, or any model-like callable). Both give the same tokens: the cache only saves recomputing the
prompt, and its decode step's logits equal the full forward's at the last position.

Padding: each row must be padded on one side, right (what :class:`VLCollator` builds) or left; the
side is read from ``attention_mask`` per row. The result is exactly that of decoding every row alone:

* causal attention means a real token never attends to anything to its right, and padding keys are
  masked, so padding cannot change a row's logits;
* M-RoPE positions are computed inside the model from ``attention_mask`` (padding is skipped and
  real tokens count up in order), so a generated token gets the position it would have in an
  unpadded sequence.

Without a cache each row's next token is written right after its last real token (into right
padding, or a new column), so the vision placeholders and ``mm_token_type_ids`` never move. With a
cache every step adds one column to all rows; a row that has finished gets a padding column there.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.distributed.tensor import DTensor

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


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError unless ``temperature`` > 0 and ``top_p`` is in (0, 1]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling scores: ``logits / temperature`` with the tokens outside the nucleus set to ``-inf``.

    The nucleus (top-p) is the smallest set of most likely tokens whose probability reaches ``top_p``:
    a token is kept when the tokens strictly more likely than it hold less than ``top_p`` in total, so
    the most likely token always survives. Ties are ordered by token id (stable sort).

    Args:
        logits: (..., vocab) scores, computed on in fp32.
        temperature: > 0; below 1 sharpens the distribution, above 1 flattens it.
        top_p: in (0, 1]; 1 keeps every token.
    """
    check_sampling(temperature, top_p)
    scores = logits.float() / temperature
    if top_p >= 1:
        return scores
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    probs = sorted_scores.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """One token id per row of (batch, vocab) ``logits``: the argmax, or a sample.

    The argmax is taken in fp32 so ties break the same way whatever the compute dtype. Sampling
    draws from :func:`filter_logits` on ``generator``'s device (the CPU without one), so a CPU
    generator serves a model on any device.
    """
    if not do_sample:
        return logits.float().argmax(-1).tolist()
    probs = filter_logits(logits, temperature, top_p).softmax(-1)
    probs = probs.to(generator.device if generator is not None else "cpu")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()


def _row_ends(mask: torch.Tensor) -> list[int]:
    """Each row's index after its last real token; refuses rows that are not left or right padded."""
    seq = mask.shape[1]
    ends = []
    for b, n in enumerate(mask.long().sum(dim=1).tolist()):
        right, left = bool(mask[b, :n].all()), bool(mask[b, seq - n :].all())
        if n == 0 or not (right or left):
            raise ValueError(f"row {b} of the batch is empty or not padded on one side (left or right padding only)")
        ends.append(n if right else seq)
    return ends


@torch.no_grad()
def generate(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    early_stop: bool = True,
) -> list[list[int]]:
    """Decode up to ``max_new_tokens`` tokens for every row of a left- or right-padded prompt batch.

    Args:
        model: the native VLM (plain, FSDP- or tensor-parallel-wrapped) or any model-like callable
            answering ``model(**inputs).logits``. It is put in eval mode for the call and returned to
            its previous mode afterwards.
        batch: prompt-only samples: ``input_ids``, ``attention_mask`` (each row padded on one side),
            optional ``mm_token_type_ids`` and vision tensors; ``labels`` are ignored.
        max_new_tokens: the most tokens generated per row.
        eos_token_id: a row stops when it produces this id (the id is not returned).
        pad_token_id: the id written into unused positions.
        do_sample: sample from the (temperature-scaled, top-p filtered) distribution instead of
            taking the argmax; see :func:`filter_logits`.
        temperature, top_p: sampling parameters (ignored when ``do_sample`` is false).
        generator: the random source of sampling (seed it for reproducible samples). Tensor-parallel
            ranks must pass identically seeded generators so they pick the same tokens.
        use_cache: decode with a KV cache when the model offers one (``model.new_kv_cache``);
            ``False`` recomputes the full forward every step (the reference the cache must equal).
        early_stop: stop as soon as every row has hit EOS. Distributed callers (FSDP) must pass
            ``False``: every rank then runs exactly ``max_new_tokens`` forwards, as the collectives
            inside the sharded forward require, whatever its own rows produced.

    Returns:
        One list of new token ids per row, without the EOS.
    """
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if do_sample:
        check_sampling(temperature, top_p)
    bsz, seq = input_ids.shape
    if max_new_tokens <= 0 or bsz == 0:
        return [[] for _ in range(bsz)]
    device = _model_device(model)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    ends = _row_ends(mask.cpu())
    vision = {k: batch[k].to(device) for k in _MODEL_INPUT_KEYS if batch.get(k) is not None}
    pick = functools.partial(
        next_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator
    )
    cache = model.new_kv_cache(seq + max_new_tokens) if use_cache and hasattr(model, "new_kv_cache") else None
    select_last = _selects_logits_positions(model)

    # Without a cache: room for every new token; columns beyond the longest row's current end are
    # trimmed off before each forward.
    width = seq + max_new_tokens if cache is None else seq
    ids = torch.full((bsz, width), pad_token_id, dtype=torch.long)
    ids[:, :seq] = input_ids.cpu()
    attn = torch.zeros((bsz, width), dtype=torch.long)
    attn[:, :seq] = mask.long().cpu()
    types = None
    if batch.get("mm_token_type_ids") is not None:
        types = torch.zeros((bsz, width), dtype=batch["mm_token_type_ids"].dtype)
        types[:, :seq] = batch["mm_token_type_ids"].cpu()

    generated: list[list[int]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    rows = torch.arange(bsz)
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            if early_stop and all(done):
                break
            if cache is not None and step > 0:
                # One column for every row: the token each row chose last step, or padding (masked,
                # no position) for a row that has finished.
                last = [generated[b][-1] if not done[b] else pad_token_id for b in range(bsz)]
                column = torch.tensor([[0 if done[b] else 1] for b in range(bsz)])
                attn = torch.cat([attn, column], dim=1)
                inputs: dict[str, Any] = {
                    "input_ids": torch.tensor(last).unsqueeze(1).to(device),
                    "attention_mask": attn.to(device),
                    "kv_cache": cache,
                }
                # Vocab-sharded (tensor-parallel) logits are gathered; every TP rank decodes alike.
                step_logits = full_logits(model(**inputs).logits)[:, -1]
            else:
                cur = max(ends)
                inputs = {"input_ids": ids[:, :cur].to(device), "attention_mask": attn[:, :cur].to(device), **vision}
                if types is not None:
                    inputs["mm_token_type_ids"] = types[:, :cur].to(device)
                if cache is not None:
                    inputs["kv_cache"] = cache
                    attn = attn[:, :cur]  # what the cache holds; decode steps add columns to it
                # Only each row's last real position matters.
                last_real = torch.tensor(ends) - 1
                if select_last:
                    inputs["logits_positions"] = last_real.to(device)
                    step_logits = full_logits(model(**inputs).logits)[:, 0]
                else:
                    logits = full_logits(model(**inputs).logits)
                    step_logits = logits[rows.to(logits.device), last_real.to(logits.device)]
            for b, token in enumerate(pick(step_logits)):
                if done[b]:
                    continue
                if token == eos_token_id:
                    done[b] = True
                    continue
                generated[b].append(int(token))
                if cache is None:
                    ids[b, ends[b]] = token
                    attn[b, ends[b]] = 1
                    ends[b] += 1  # new text token: mm_token_type_ids stays 0
    finally:
        model.train(was_training)
    return generated


def _selects_logits_positions(model: nn.Module) -> bool:
    """Whether ``model`` can return the logits of one position per row (``logits_positions``).

    The native model can (it offers ``new_kv_cache``), except under tensor parallelism: with sequence
    parallelism its final hidden states are sequence shards, and the vocab-parallel head's logits
    are gathered anyway. FSDP-sharded heads are whole during the forward.
    """
    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(model, "new_kv_cache"):
        return False
    weight = head.weight
    if isinstance(weight, DTensor):
        return "tp" not in (weight.device_mesh.mesh_dim_names or ())
    return True


def greedy_generate(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    *,
    early_stop: bool = True,
) -> list[list[int]]:
    """Greedy :func:`generate` (with the KV cache when the model offers one); same arguments."""
    return generate(
        model, batch, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        early_stop=early_stop,
    )


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
