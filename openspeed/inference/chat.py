"""Answer questions about images with a trained run (``openspeed chat``).

Answers are greedy by default; with a ``temperature`` and/or ``top_p`` they are sampled (see
:func:`~openspeed.inference.generate.generate`), reproducibly when a ``seed`` is given.

The model and its KV cache are on ``device`` (``"auto"``: this machine's accelerator, the CPU when it
has none; see :func:`openspeed.accelerator.resolve_device`); the prompts are moved there and the
answers come back as text. Sampling draws from a CPU generator, so a seed gives the same draws on
any device (the tokens then differ only where the device's rounding changes the distribution).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from openspeed.accelerator import resolve_device
from openspeed.data.collator import VLCollator
from openspeed.errors import BadSampleError, DataError
from openspeed.inference.generate import build_prompt_sample, check_sampling, generate
from openspeed.training.run_loading import load_trained_model

IMAGE_TAG = "<image>"


def _user_messages(question: str, num_images: int) -> list[dict[str, str]]:
    """One user turn; images without ``<image>`` tags in the text go in front of it."""
    missing = num_images - question.count(IMAGE_TAG)
    if missing > 0:
        question = IMAGE_TAG * missing + question
    return [{"role": "user", "content": question}]


class _Answerer:
    def __init__(self, run_dir: str, max_new_tokens: int, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, device: torch.device | str | None = "auto"):
        # Sampling only when asked for; checked before the (slow) model load.
        self.do_sample = temperature is not None or top_p is not None
        self.temperature = 1.0 if temperature is None else temperature
        self.top_p = 1.0 if top_p is None else top_p
        if self.do_sample:
            check_sampling(self.temperature, self.top_p)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.model, self.processor, self.run_cfg, self.step = load_trained_model(run_dir, resolve_device(device))
        self.collate = VLCollator(self.processor.pad_token_id, self.processor.image_token_id,
                                  self.processor.video_token_id)
        self.max_new_tokens = max_new_tokens

    def answer(self, samples: list[dict[str, Any]]) -> list[str]:
        tokens = generate(
            self.model, self.collate(samples), max_new_tokens=self.max_new_tokens,
            eos_token_id=self.processor.eos_token_id, pad_token_id=self.processor.pad_token_id,
            do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
            generator=self.generator,
        )
        return [self.processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def answer_one(run_dir: str, question: str, images: list[str], max_new_tokens: int = 32, *,
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               device: torch.device | str | None = "auto") -> str:
    """The run's answer to ``question`` about ``images``: greedy, or sampled when ``temperature`` or
    ``top_p`` is given (reproducibly with ``seed``), with the model on ``device``."""
    answerer = _Answerer(run_dir, max_new_tokens, temperature, top_p, seed, device)
    sample = build_prompt_sample(answerer.processor, _user_messages(question, len(images)), images)
    return answerer.answer([sample])[0]


def _record_prompt(record: dict[str, Any], base: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(messages up to the question, image paths) for a questions-file record."""
    images = record.get("images")
    if images is None:
        images = [record["image"]] if record.get("image") else []
    if isinstance(images, str):
        images = [images]
    images = [p if os.path.isabs(p) else os.path.join(base, p) for p in images]
    if "messages" in record or "conversations" in record:
        messages = record.get("messages") or record.get("conversations")
        # Answer the last user turn: drop a trailing reference answer if the record carries one.
        last = messages[-1]
        if last.get("role", last.get("from")) in ("assistant", "gpt"):
            messages = messages[:-1]
        return messages, images
    if "question" not in record:
        raise BadSampleError("malformed_record", "needs 'question' (or 'messages')")
    return _user_messages(str(record["question"]), len(images)), images


def answer_file(run_dir: str, questions_path: str, out_path: str | None, max_new_tokens: int = 32,
                batch_size: int = 8, *, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, device: torch.device | str | None = "auto") -> tuple[int, int]:
    """Answer every record of a JSONL file; write each record plus ``prediction`` as JSONL.

    Sampling options and ``device`` as in :func:`answer_one` (one random stream over the whole
    file). Unusable records (bad JSON, missing image) are written with an ``error`` field instead and
    counted. Returns (answered, skipped).
    """
    answerer = _Answerer(run_dir, max_new_tokens, temperature, top_p, seed, device)
    base = os.path.dirname(os.path.abspath(questions_path))
    try:
        with open(questions_path, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
    except OSError as exc:
        raise DataError(f"cannot read {questions_path}: {exc.strerror}") from None
    out = open(out_path, "w", encoding="utf-8") if out_path else sys.stdout  # noqa: SIM115
    answered = skipped = 0
    pending: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def flush() -> None:
        nonlocal answered
        if not pending:
            return
        for (record, _), prediction in zip(pending, answerer.answer([s for _, s in pending])):
            out.write(json.dumps({**record, "prediction": prediction}) + "\n")
            answered += 1
        pending.clear()

    try:
        for lineno, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise BadSampleError("malformed_record", "not a JSON object")
                messages, images = _record_prompt(record, base)
                sample = build_prompt_sample(answerer.processor, messages, images)
            except (json.JSONDecodeError, BadSampleError, KeyError, TypeError, AttributeError) as exc:
                flush()
                out.write(json.dumps({"line": lineno, "error": str(exc)}) + "\n")
                skipped += 1
                continue
            pending.append((record, sample))
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return answered, skipped
