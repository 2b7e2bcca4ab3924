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
    return _pick_tokens(logits, do_sample, temperature, top_p, generator).tolist()


def _pick_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """:func:`next_tokens` as a (batch,) long tensor on ``logits``' device (no host copy when greedy)."""
    if not do_sample:
        return logits.float().argmax(-1)
    probs = filter_logits(logits, temperature, top_p).softmax(-1)
    probs = probs.to(generator.device if generator is not None else "cpu")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


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
            optional ``mm_token_type_ids`` and vision tensors; ``labels`` are ignored. The tensors
            may be on any device: they are moved to the model's (that of its first parameter).
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

    The decoding state (tokens, masks, which rows are done) stays on the model's device: a step
    reads nothing back to the host except, with ``early_stop``, whether every row is done (and,
    without a cache, how long the longest row now is), and a sampled step's draw on the
    generator's device.
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
    ends = _row_ends(mask.cpu())  # the prompt's layout, read on the host once
    prompt = {
        "input_ids": input_ids.to(device, torch.long),
        "attention_mask": mask.to(device, torch.long),
        **{k: batch[k].to(device) for k in _MODEL_INPUT_KEYS if batch.get(k) is not None},
    }
    if batch.get("mm_token_type_ids") is not None:
        prompt["mm_token_type_ids"] = batch["mm_token_type_ids"].to(device)
    pick = functools.partial(
        _pick_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator
    )
    decode = _decode_with_cache if use_cache and hasattr(model, "new_kv_cache") else _decode_recomputing
    was_training = model.training
    model.eval()
    try:
        tokens, counts = decode(model, prompt, ends, pick, max_new_tokens, eos_token_id, pad_token_id,
                                early_stop, _selects_logits_positions(model))
    finally:
        model.train(was_training)
    # One copy back at the end: each row's tokens up to its EOS (a prefix of its columns).
    return [row[:n] for row, n in zip(tokens.tolist(), counts.tolist())]


def _prompt_logits(model: nn.Module, inputs: dict[str, Any], last_real: torch.Tensor,
                   select_last: bool) -> torch.Tensor:
    """(batch, vocab) logits at each row's last real position ``last_real`` (batch,)."""
    if select_last:
        return full_logits(model(**inputs, logits_positions=last_real).logits)[:, 0]
    logits = full_logits(model(**inputs).logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_real.to(logits.device)]


def _record(step: int, token: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, done: torch.Tensor,
            eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Write step ``step``'s tokens of the rows still going into ``tokens`` / ``counts`` (in place);
    returns which rows took a real (non-EOS) token. ``done`` gains the rows that hit EOS."""
    real = ~done & (token != eos_token_id)
    tokens[:, step] = torch.where(real, token, pad_token_id)
    counts += real
    done |= token == eos_token_id
    return real


def _decode_with_cache(model: nn.Module, prompt: dict[str, Any], ends: list[int], pick, max_new_tokens: int,
                       eos_token_id: int, pad_token_id: int, early_stop: bool,
                       select_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt once (the prefill), then one column for every row per step, read from the cache.

    A row that has finished gets a padding column (masked, no position). Returns the (batch,
    max_new_tokens) tokens and each row's count of real ones, on the model's device.
    """
    ids = prompt["input_ids"]
    bsz, device = ids.shape[0], ids.device
    cur = max(ends)  # columns past every row's end hold padding only: not cached
    inputs = {k: v[:, :cur] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in prompt.items()}
    attn = inputs["attention_mask"]
    cache = model.new_kv_cache(cur + max_new_tokens)
    tokens = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    counts = torch.zeros(bsz, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    last_real = torch.tensor(ends, device=device) - 1
    logits = _prompt_logits(model, {**inputs, "kv_cache": cache}, last_real, select_last)
    for step in range(max_new_tokens):
        token = pick(logits)
        _record(step, token, tokens, counts, done, eos_token_id, pad_token_id)
        if step == max_new_tokens - 1 or (early_stop and bool(done.all())):  # the one sync of a step
            break
        # The token each row chose, or padding for a row that has finished.
        attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
        step_ids = torch.where(done, pad_token_id, token)[:, None]
        # Vocab-sharded (tensor-parallel) logits are gathered; every TP rank decodes alike.
        logits = full_logits(model(input_ids=step_ids, attention_mask=attn, kv_cache=cache).logits)[:, -1]
    return tokens, counts


def _decode_recomputing(model: nn.Module, prompt: dict[str, Any], ends: list[int], pick, max_new_tokens: int,
                        eos_token_id: int, pad_token_id: int, early_stop: bool,
                        select_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The full forward every step; each row's next token is written right after its last real token
    (into right padding, or one of ``max_new_tokens`` new columns), so the vision placeholders and
    ``mm_token_type_ids`` never move. Columns past the longest row's end are trimmed off before each
    forward."""
    ids = prompt["input_ids"]
    bsz, device = ids.shape[0], ids.device

    def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((bsz, max_new_tokens), fill)], dim=1)

    ids, attn = widen(ids, pad_token_id), widen(prompt["attention_mask"], 0)
    types = widen(prompt["mm_token_type_ids"], 0) if "mm_token_type_ids" in prompt else None  # new: text
    vision = {k: v for k, v in prompt.items() if k in _MODEL_INPUT_KEYS}
    tokens = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    counts = torch.zeros(bsz, dtype=torch.long, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    row_ends = torch.tensor(ends, device=device)
    rows = torch.arange(bsz, device=device)
    cur = max(ends)
    for step in range(max_new_tokens):
        inputs = {"input_ids": ids[:, :cur], "attention_mask": attn[:, :cur], **vision}
        if types is not None:
            inputs["mm_token_type_ids"] = types[:, :cur]
        token = pick(_prompt_logits(model, inputs, row_ends - 1, select_last))
        real = _record(step, token, tokens, counts, done, eos_token_id, pad_token_id)
        at = row_ends  # within the widened rows: each has room for all its new tokens
        ids[rows, at] = torch.where(real, token, ids[rows, at])
        attn[rows, at] = torch.where(real, 1, attn[rows, at])
        row_ends += real
        if step == max_new_tokens - 1:
            break
        # The step's one read-back: the longest row (the next forward's width), and whether all are done.
        cur, finished = torch.stack([row_ends.max(), done.all().long()]).tolist()
        if early_stop and finished:
            break
    return tokens, counts


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
