"""Short-answer VQA evaluation: greedy answers, normalised exact match, per-question-type accuracy.

``chance_accuracy`` is the score of a model that ignores the image and always gives each question
type's most common answer; together with ``evaluate_vqa(..., blank_images=True)`` it tells whether a
model actually looks at the pixels or only learned the answer prior.
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from openspeed.data.collator import VLCollator
from openspeed.data.conversation import ConversationDataset, load_image, normalize_messages
from openspeed.data.processor import VLProcessor
from openspeed.errors import BadSampleError
from openspeed.inference.generate import build_prompt_sample, greedy_generate

DEFAULT_QTYPE = "all"
# Mid-grey normalises to roughly zero under the CLIP mean/std: the least informative input.
BLANK_COLOUR = (128, 128, 128)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, turn punctuation into spaces, drop the articles a/an/the, collapse whitespace."""
    text = str(text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_predictions(predictions: list[str], answers: list[str], qtypes: list[str]) -> dict[str, Any]:
    """Exact-match accuracy after :func:`normalize_answer`, overall and per question type.

    Returns ``accuracy`` (0.0 when there is nothing to score), ``correct``, ``n``, ``per_type``
    (type -> accuracy) and ``per_type_n`` (type -> count).
    """
    if not len(predictions) == len(answers) == len(qtypes):
        raise ValueError(
            f"predictions ({len(predictions)}), answers ({len(answers)}) and qtypes ({len(qtypes)}) "
            "must have the same length"
        )
    totals: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for pred, ans, qtype in zip(predictions, answers, qtypes):
        totals[qtype] += 1
        hits[qtype] += normalize_answer(pred) == normalize_answer(ans)
    n = sum(totals.values())
    correct = sum(hits.values())
    return {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "n": n,
        "per_type": {t: hits[t] / totals[t] for t in sorted(totals)},
        "per_type_n": {t: totals[t] for t in sorted(totals)},
    }


def chance_accuracy(answers: list[str], qtypes: list[str]) -> float:
    """Accuracy of always answering each type's most common (normalised) answer, on these answers."""
    if len(answers) != len(qtypes):
        raise ValueError(f"answers ({len(answers)}) and qtypes ({len(qtypes)}) must have the same length")
    if not answers:
        return 0.0
    by_type: dict[str, Counter[str]] = {}
    for ans, qtype in zip(answers, qtypes):
        by_type.setdefault(qtype, Counter())[normalize_answer(ans)] += 1
    best = sum(counts.most_common(1)[0][1] for counts in by_type.values())
    return best / len(answers)


def _media_paths(record: dict[str, Any], key: str, root: Path) -> list[Path]:
    """The record's media list resolved as the dataset resolves it (relative to its media root)."""
    value = record.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadSampleError("malformed_record", f"'{key}' must be a list of paths")
    return [Path(v) if os.path.isabs(v) else root / v for v in value]


def _blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, BLANK_COLOUR)


def _prompt_and_answer(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Split a record into the prompt (every turn before the last reply) and the reference answer.

    The reference is the record's ``answer`` field when present, else the last assistant reply.
    """
    try:
        messages = normalize_messages(record)
    except ValueError as e:
        raise BadSampleError("malformed_record", str(e)) from e
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = record.get("answer", messages[last]["content"])
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise BadSampleError("malformed_record", f"answer must be text, got {type(answer).__name__}")
    return messages[:last], str(answer)


def _build_eval_sample(
    processor: VLProcessor, dataset: ConversationDataset, index: int, blank_images: bool
) -> tuple[dict[str, Any], str, str]:
    """(prompt sample, reference answer, question type) of record ``index``; ``BadSampleError`` if unusable."""
    record = dataset.record(index)
    prompt, answer = _prompt_and_answer(record)
    images = [load_image(p) for p in _media_paths(record, "images", dataset.media_root)]
    if blank_images:
        # The real image is still loaded: its size fixes the token count, and a record whose image is
        # missing is skipped in both the normal and the blank run, so they score the same samples.
        images = [_blank_like(im) for im in images]
    videos = _media_paths(record, "videos", dataset.media_root)
    sample = build_prompt_sample(
        processor,
        prompt,
        images,
        videos,
        video_fps=dataset.video_fps,
        video_max_frames=dataset.video_max_frames,
    )
    if sample["input_ids"].numel() > dataset.max_seq_len:
        raise BadSampleError(
            "too_long", f"prompt of {sample['input_ids'].numel()} tokens > max_seq_len {dataset.max_seq_len}"
        )
    return sample, answer, str(record.get("qtype", DEFAULT_QTYPE))


def evaluate_vqa(
    model: nn.Module,
    processor: VLProcessor,
    dataset: ConversationDataset,
    indices: Iterable[int],
    *,
    batch_size: int,
    blank_images: bool = False,
    max_new_tokens: int = 8,
    early_stop: bool = True,
) -> dict[str, Any]:
    """Answer the records at ``indices`` greedily and score them against their reference answers.

    Each record's prompt is every turn before its last assistant reply, rendered as in training and
    ending with ``<|im_start|>assistant\\n``. With ``blank_images`` every image becomes a mid-grey
    image of the same size. Records that cannot be used (missing image, malformed, too long) are
    skipped and counted. Pass ``early_stop=False`` when the model is sharded across ranks (see
    :func:`greedy_generate`); every rank must then also get the same number of batches.

    Returns the :func:`score_predictions` fields plus ``predictions``, ``answers``, ``qtypes`` and
    ``indices`` of the scored records, ``chance_accuracy`` on those answers, ``skipped`` and
    ``skipped_reasons`` (reason -> count).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    collate = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)
    predictions: list[str] = []
    answers: list[str] = []
    qtypes: list[str] = []
    kept: list[int] = []
    skipped: Counter[str] = Counter()
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        new_tokens = greedy_generate(
            model,
            collate(pending),
            max_new_tokens,
            processor.eos_token_id,
            processor.pad_token_id,
            early_stop=early_stop,
        )
        for tokens in new_tokens:
            predictions.append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        pending.clear()

    for index in indices:
        try:
            sample, answer, qtype = _build_eval_sample(processor, dataset, int(index), blank_images)
        except BadSampleError as e:
            skipped[e.reason] += 1
            continue
        pending.append(sample)
        answers.append(answer)
        qtypes.append(qtype)
        kept.append(int(index))
        if len(pending) == batch_size:
            flush()
    flush()

    return {
        **score_predictions(predictions, answers, qtypes),
        "chance_accuracy": chance_accuracy(answers, qtypes),
        "predictions": predictions,
        "answers": answers,
        "qtypes": qtypes,
        "indices": kept,
        "skipped": sum(skipped.values()),
        "skipped_reasons": dict(skipped),
    }
