"""MMBench-style TSV evaluation: multiple-choice and short-answer VQA (``openspeed eval``).

The file layout is the one the common VLM evaluation toolkits read for MMBench-style sets: a
tab-separated file with a header row and the columns

* ``index`` (optional; the row number otherwise), ``question``, ``hint`` (optional),
* ``A``, ``B``, ``C``, ``D`` … (any subset; the options of a row are its non-empty letter columns),
* ``answer`` (the option letter; a short-answer row, one without options, holds the answer text),
* ``category`` (optional; accuracy is reported per category),
* ``image`` (base64-encoded PNG/JPEG, or the ``index`` of another row whose image it shares, as
  MMBench writes repeated images) and/or ``image_path`` (a path, relative to the TSV file).

Empty cells and the text ``nan`` (how pandas writes a missing value) count as absent. A row that
cannot be used is skipped and reported with its row number and the problem; a file that cannot be
read at all raises :class:`~openspeed.errors.DataError`.

Prompts are built the way the LLaVA-style MMBench evaluation builds them: hint, question, one line
``"A. text"`` per option and the instruction :data:`CHOICE_INSTRUCTION`; a short-answer row's prompt
is its question alone. The image goes in front of the text. Answers are scored with
:func:`judge`: see :func:`extract_choice` for how a reply becomes an option letter.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from openspeed.errors import BadSampleError, DataError
from openspeed.eval.vqa import normalize_answer

if TYPE_CHECKING:
    import torch

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# "choices": the MMBench prompt with the options; "question": the question alone, the options only
# used to read the reply (for models trained on bare questions, such as the shapes demo).
PROMPT_STYLES = ("choices", "question")
DEFAULT_CATEGORY = "all"
# Columns named by one capital letter hold the options.
OPTION_COLUMNS = tuple(string.ascii_uppercase)
# MMBench writes a repeated image once and puts the owning row's index (a short string) elsewhere.
_MAX_IMAGE_REFERENCE_CHARS = 64
_MISSING = ("", "nan")

# "B", "B.", "B:", "B)", "(B)", optionally followed by text: the letter the reply starts with.
_LEADING_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))")
# "B red": a bare letter and a space, accepted only when the rest is that option's text.
_LETTER_AND_TEXT = re.compile(r"^([A-Z])\s+(.+)$", re.DOTALL)
# "The answer is B", "Answer: (B)", "option B", "the correct option is B": the letter named after
# "answer" or "option".
_NAMED_LETTER = re.compile(r"(?i:\b(?:answer|option)(?:\s+is)?\s*[:：]?\s*)\(?([A-Z])(?![A-Za-z])")


@dataclass
class TsvRow:
    """One usable row of an evaluation TSV."""

    row: int  # 1-based data row number (the header is row 0)
    index: str
    question: str
    answer: str  # an option letter for multiple-choice rows, the reference text otherwise
    category: str = DEFAULT_CATEGORY
    hint: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # letter -> text, in column order
    image_bytes: bytes | None = None  # decoded from the base64 ``image`` column
    image_path: str | None = None  # absolute path from the ``image_path`` column

    @property
    def is_choice(self) -> bool:
        return bool(self.options)


@dataclass
class SkippedRow:
    """A row left out of the evaluation, and why."""

    row: int
    index: str | None
    problem: str

    def describe(self) -> str:
        where = f"row {self.row}" + (f" (index {self.index})" if self.index is not None else "")
        return f"{where}: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "index": self.index, "problem": self.problem}


@dataclass
class TsvData:
    """The usable rows of an evaluation TSV and the rows that were skipped."""

    path: str
    rows: list[TsvRow]
    skipped: list[SkippedRow]


# ----------------------------------------------------------------------------- reading


def _cell(value: str | None) -> str | None:
    """A cell's text, or ``None`` when it is empty or pandas' ``nan``."""
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _MISSING else value


def _resolve_answer(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer cell names: the letter itself, or the text of exactly one option."""
    letter = answer.strip().strip("().").strip()
    if letter in options:
        return letter
    same = [k for k, text in options.items() if normalize_answer(text) == normalize_answer(answer)]
    return same[0] if len(same) == 1 else None


def _read_table(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(row number, fields)]) of a tab-separated file; ``DataError`` if it cannot be read."""
    old_limit = csv.field_size_limit()
    # Base64 images are far longer than csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header row)")
            rows = [(number, fields) for number, fields in enumerate(reader, start=1) if fields]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable TSV file ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    finally:
        csv.field_size_limit(old_limit)
    return [name.strip() for name in header], rows


class _RowProblem(Exception):
    """Why one row cannot be used (the message)."""


def _parse_row(
    number: int, cells: dict[str, str | None], option_columns: list[str], base: str
) -> tuple[TsvRow, str | None]:
    """(row, the index its image cell refers to or None) from one row's cells; ``_RowProblem`` if unusable."""
    question, answer = cells.get("question"), cells.get("answer")
    if question is None:
        raise _RowProblem("empty question")
    if answer is None:
        raise _RowProblem("empty answer")
    options = {letter: text for letter in option_columns if (text := cells[letter]) is not None}
    if options:
        letter = _resolve_answer(answer, options)
        if letter is None:
            raise _RowProblem(f"answer '{answer}' is not one of the options {', '.join(options)}")
        answer = letter
    row = TsvRow(number, cells.get("index") or str(number), question, answer,
                 cells.get("category") or DEFAULT_CATEGORY, cells.get("hint"), options)

    image, image_path = cells.get("image"), cells.get("image_path")
    if image is not None and len(image) <= _MAX_IMAGE_REFERENCE_CHARS and not image.startswith("data:"):
        return row, image
    if image is not None:
        try:
            # A "data:image/png;base64," prefix is allowed, as some exporters write one.
            row.image_bytes = base64.b64decode(image.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise _RowProblem("image is not valid base64") from None
    elif image_path is not None:
        row.image_path = image_path if os.path.isabs(image_path) else os.path.join(base, image_path)
        if not os.path.isfile(row.image_path):
            raise _RowProblem(f"image file not found: {row.image_path}")
    else:
        raise _RowProblem("no image (empty 'image' and 'image_path')")
    return row, None


def read_tsv(path: str | os.PathLike) -> TsvData:
    """Read an MMBench-style evaluation TSV (layout in the module docstring).

    Every usable row becomes a :class:`TsvRow`; a malformed row (wrong number of fields, no question
    or answer, an answer that is none of the options, no image, invalid base64, a missing image
    file, a repeated index) becomes a :class:`SkippedRow` naming the problem. Raises ``DataError``
    when the file is missing, is not UTF-8 text, or its header lacks ``question``, ``answer`` or an
    image column.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"evaluation file not found: {path}")
    header, table = _read_table(path)
    missing = [name for name in ("question", "answer") if name not in header]
    if missing:
        raise DataError(f"{path}: the header has no {' or '.join(repr(m) for m in missing)} column "
                        f"(columns: {', '.join(header) or 'none'})")
    if "image" not in header and "image_path" not in header:
        raise DataError(f"{path}: the header has neither an 'image' (base64) nor an 'image_path' column")
    column = {name: i for i, name in enumerate(header)}
    option_columns = [name for name in header if name in OPTION_COLUMNS]
    base = os.path.dirname(os.path.abspath(path))

    rows: list[TsvRow] = []
    skipped: list[SkippedRow] = []
    # Image cells that name another row's index (position in ``rows`` -> index), resolved at the end.
    references: dict[int, str] = {}
    seen: set[str] = set()
    for number, fields in table:
        index = _cell(fields[column["index"]]) if "index" in column and len(fields) > column["index"] else None
        try:
            if len(fields) != len(header):
                raise _RowProblem(f"has {len(fields)} fields, the header has {len(header)}")
            cells = {name: _cell(fields[i]) for name, i in column.items()}
            row, reference = _parse_row(number, cells, option_columns, base)
            if row.index in seen:
                raise _RowProblem("repeats an earlier row's index")
        except _RowProblem as e:
            skipped.append(SkippedRow(number, index, str(e)))
            continue
        if reference is not None:
            references[len(rows)] = reference
        seen.add(row.index)
        rows.append(row)

    if references:
        owners = {row.index: row for row in rows if row.image_bytes is not None}
        kept: list[TsvRow] = []
        for position, row in enumerate(rows):
            if position in references:
                owner = owners.get(references[position])
                if owner is None:
                    skipped.append(SkippedRow(row.row, row.index, "image names no row with a base64 image "
                                                                  f"('{references[position]}')"))
                    continue
                row.image_bytes = owner.image_bytes
            kept.append(row)
        rows = kept
        skipped.sort(key=lambda s: s.row)
    return TsvData(path, rows, skipped)


def load_row_image(row: TsvRow) -> Image.Image:
    """The row's image as RGB; ``BadSampleError`` when it cannot be decoded."""
    from openspeed.data.conversation import load_image

    if row.image_path is not None:
        return load_image(row.image_path)
    try:
        with Image.open(io.BytesIO(row.image_bytes or b"")) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSampleError("corrupt_media", f"undecodable image: {e}") from None


# ----------------------------------------------------------------------------- prompts and scoring


def build_prompt(row: TsvRow, style: str = "choices") -> str:
    """The question text the model sees (without the image placeholder).

    Multiple choice with ``style="choices"``: ``hint`` (when present), the question, ``"A. text"``
    per option, then :data:`CHOICE_INSTRUCTION`, one per line. Short answer, or ``style="question"``:
    the question alone (the reply is then matched to an option by its text).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if not row.options or style == "question":
        return row.question
    lines = [row.hint] if row.hint else []
    lines.append(row.question)
    lines += [f"{letter}. {text}" for letter, text in row.options.items()]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a reply gives, or ``None`` when it cannot be read as exactly one option.

    In order: a letter the reply starts with (``B``, ``B.``, ``(B)``, ``B) text``, ``B: text``, or
    ``B text`` when the text is option B's); a letter named after "answer"/"option" (``The answer is
    B``, ``Answer: (B)``); the reply equal to exactly one option's text (after
    :func:`~openspeed.eval.vqa.normalize_answer`); the reply containing exactly one option's text as
    whole words. Letters must be capitals and among ``options``.
    """
    text = str(prediction).strip()
    match = _LEADING_LETTER.match(text)
    if match:
        letter = match.group(1) or match.group(2)
        if letter in options:
            return letter
    match = _LETTER_AND_TEXT.match(text)
    if match and match.group(1) in options:
        if normalize_answer(match.group(2)) == normalize_answer(options[match.group(1)]):
            return match.group(1)
    match = _NAMED_LETTER.search(text)
    if match and match.group(1) in options:
        return match.group(1)
    reply = normalize_answer(text)
    if not reply:
        return None
    normalized = {letter: normalize_answer(option) for letter, option in options.items()}
    same = [letter for letter, option in normalized.items() if option and option == reply]
    if len(same) == 1:
        return same[0]
    inside = [letter for letter, option in normalized.items() if option and f" {option} " in f" {reply} "]
    return inside[0] if len(inside) == 1 else None


def judge(row: TsvRow, prediction: str) -> dict[str, Any]:
    """One scored answer: ``index``, ``category``, ``prediction``, ``extracted``, ``answer``,
    ``correct`` and ``parsed``.

    A multiple-choice reply is correct when :func:`extract_choice` gives the answer letter; one that
    gives no letter is wrong and ``parsed`` is False. A short-answer reply is correct on a normalised
    exact match (:func:`~openspeed.eval.vqa.normalize_answer`); ``extracted`` is then the normalised
    reply and ``parsed`` is always True.
    """
    if row.options:
        extracted = extract_choice(prediction, row.options)
        correct, parsed = extracted == row.answer, extracted is not None
    else:
        extracted = normalize_answer(prediction)
        correct, parsed = extracted == normalize_answer(row.answer), True
    return {
        "index": row.index,
        "category": row.category,
        "prediction": prediction,
        "extracted": extracted,
        "answer": row.answer,
        "correct": bool(correct),
        "parsed": parsed,
    }


def summarize(judgements: Sequence[dict[str, Any]], rows: Sequence[TsvRow] | None = None) -> dict[str, Any]:
    """Accuracy overall and per category from :func:`judge` results.

    Returns ``accuracy`` (0.0 when nothing was scored), ``correct``, ``n``, ``unparseable`` (replies
    to multiple-choice rows that named no option; they count as wrong) and ``per_category``
    (category -> the same four fields). With the ``rows`` that were judged (same order), also
    ``multiple_choice`` and ``short_answer`` counts and ``random_choice_accuracy``: the expected score
    of picking an option uniformly at random (short-answer rows count 0).
    """

    def scores(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        correct = sum(j["correct"] for j in items)
        return {
            "accuracy": correct / len(items) if items else 0.0,
            "correct": correct,
            "n": len(items),
            "unparseable": sum(not j["parsed"] for j in items),
        }

    by_category: dict[str, list[dict[str, Any]]] = {}
    for j in judgements:
        by_category.setdefault(j["category"], []).append(j)
    result = {**scores(judgements), "per_category": {c: scores(by_category[c]) for c in sorted(by_category)}}
    if rows is not None:
        if len(rows) != len(judgements):
            raise ValueError(f"rows ({len(rows)}) and judgements ({len(judgements)}) must have the same length")
        result["multiple_choice"] = sum(row.is_choice for row in rows)
        result["short_answer"] = len(rows) - result["multiple_choice"]
        guess = sum(1 / len(row.options) for row in rows if row.options)
        result["random_choice_accuracy"] = guess / len(rows) if rows else 0.0
    return result


# ----------------------------------------------------------------------------- evaluation


def evaluate_tsv(
    model,
    processor,
    rows: Sequence[TsvRow],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_style: str = "choices",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Answer every row greedily (one process, batches of ``batch_size``) and score the answers.

    Prompts are :func:`build_prompt` with ``prompt_style``. A row whose image cannot be decoded or
    whose prompt cannot be built is skipped. ``progress``: True shows a bar on stderr, None shows one
    only when stderr is a terminal.

    Returns the :func:`summarize` fields plus ``predictions`` (the :func:`judge` dict of each scored
    row, in file order) and ``skipped_rows`` (:class:`SkippedRow` list).
    """
    from tqdm import tqdm

    from openspeed.data.collator import VLCollator
    from openspeed.inference.generate import build_prompt_sample, greedy_generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    collate = VLCollator(processor.pad_token_id, processor.image_token_id, processor.video_token_id)
    judgements: list[dict[str, Any]] = []
    judged: list[TsvRow] = []
    skipped: list[SkippedRow] = []
    pending: list[tuple[TsvRow, dict[str, Any]]] = []
    bar = tqdm(total=len(rows), desc="eval", unit="q", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress, mininterval=0.5)

    def flush() -> None:
        if not pending:
            return
        tokens = greedy_generate(model, collate([s for _, s in pending]), max_new_tokens,
                                 processor.eos_token_id, processor.pad_token_id)
        for (row, _), new in zip(pending, tokens):
            judgements.append(judge(row, processor.tokenizer.decode(new, skip_special_tokens=True).strip()))
            judged.append(row)
        bar.update(len(pending))
        pending.clear()

    try:
        for row in rows:
            try:
                image = load_row_image(row)
                messages = [{"role": "user", "content": "<image>" + build_prompt(row, prompt_style)}]
                sample = build_prompt_sample(processor, messages, [image])
            except BadSampleError as e:
                skipped.append(SkippedRow(row.row, row.index, str(e)))
                bar.update(1)
                continue
            pending.append((row, sample))
            if len(pending) == batch_size:
                flush()
        flush()
    finally:
        bar.close()
    return {**summarize(judgements, judged), "predictions": judgements, "skipped_rows": skipped}


def write_results(result: dict[str, Any], out_dir: str | os.PathLike, **meta: Any) -> dict[str, str]:
    """Write ``results.json`` (scores, skipped rows, ``meta``) and ``predictions.jsonl`` (one
    :func:`judge` dict per line) into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    predictions_path = os.path.join(out_dir, "predictions.jsonl")
    summary = {k: v for k, v in result.items() if k not in ("predictions", "skipped_rows")}
    skipped = [s.to_dict() for s in result["skipped_rows"]]
    with open(results_path, "w", encoding="utf-8") as fh:
        json.dump({**meta, **summary, "skipped": len(skipped), "skipped_rows": skipped}, fh, indent=2,
                  ensure_ascii=False)
        fh.write("\n")
    with open(predictions_path, "w", encoding="utf-8") as fh:
        for item in result["predictions"]:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    return {"results": results_path, "predictions": predictions_path}


def run_tsv_eval(
    checkpoint: str,
    data_path: str,
    out_dir: str | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    prompt_style: str = "choices",
    progress: bool | None = None,
    report=None,
    device: torch.device | str | None = "auto",
) -> dict[str, Any]:
    """``openspeed eval``: read the TSV, load the run's latest checkpoint, answer, score, write.

    ``limit`` keeps the first N usable rows. ``out_dir`` defaults to ``<run_dir>/eval/<tsv name>``.
    ``report`` (e.g. ``print``) receives one line per skipped row. The model (and its KV cache) is
    on ``device`` (``"auto"``: this machine's accelerator, the CPU when it has none; see
    :func:`openspeed.accelerator.resolve_device`). Returns the :func:`evaluate_tsv` result plus
    ``step``, ``run_dir``, ``out_dir`` and the written ``files``.
    """
    from openspeed.accelerator import resolve_device
    from openspeed.data.processor import VLProcessor
    from openspeed.training.run_loading import load_trained

    device = resolve_device(device)  # a device this machine lacks: one line, before any reading
    data = read_tsv(data_path)
    rows = data.rows[:limit] if limit is not None else data.rows
    if not rows:
        raise DataError(f"{data_path}: no usable rows ({len(data.skipped)} skipped"
                        + (f"; first: {data.skipped[0].describe()})" if data.skipped else ")"))
    trained = load_trained(checkpoint, device)
    processor = VLProcessor.from_pretrained(trained.run_config.model.path)
    result = evaluate_tsv(trained.model, processor, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          prompt_style=prompt_style, progress=progress)
    # Rows skipped while reading count up to the last row the limit keeps.
    read_skips = [s for s in data.skipped if limit is None or s.row < rows[-1].row]
    result["skipped_rows"] = sorted(read_skips + result["skipped_rows"], key=lambda s: s.row)
    if report is not None:
        for item in result["skipped_rows"]:
            report(f"skipped {item.describe()}")
    out_dir = out_dir or os.path.join(trained.run_dir, "eval", os.path.splitext(os.path.basename(data_path))[0])
    result["files"] = write_results(result, out_dir, data=os.path.abspath(data_path), run_dir=trained.run_dir,
                                    checkpoint=trained.checkpoint, step=trained.step, limit=limit,
                                    max_new_tokens=max_new_tokens, prompt=prompt_style)
    result.update(step=trained.step, run_dir=trained.run_dir, out_dir=out_dir)
    return result
