"""Synthetic "shapes" VQA demo set and a tiny, weightless Qwen2.5-VL model directory.

Everything here is generated offline and deterministically from a seed, so tests and the demo
recipe need no model hub: coloured shapes on a grid, one short question per image, and a
Hugging Face-format model directory (config, byte-level BPE tokenizer trained on the data's
words, image-processor settings) that ``VLProcessor`` and the model loader can read.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL / Qwen2.5-VL chat template (string content, or a list of typed parts). A default system
# turn is inserted when the conversation has none, exactly as the released models do.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenisation regex: splits words (with one leading non-letter such as a space),
# single digits, punctuation runs and newlines, so merges never cross a word boundary.
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Text that every tiny tokenizer learns, whatever the data: chat roles, the default system
# prompt and common punctuation, so rendered conversations never fall apart into bytes.
_BASE_CORPUS: tuple[str, ...] = (
    "system",
    "user",
    "assistant",
    DEFAULT_SYSTEM_PROMPT,
    "Picture",
    "Video",
    "yes",
    "no",
    ". , ? ! : ; ' \" ( ) -",
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Four well-separated colours and four distinct outlines: a model of a few hundred thousand
# parameters learns them from scratch within the demo's ten minutes on a 2-core CPU.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COUNT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
QTYPES: tuple[str, ...] = ("colour", "shape", "position", "count")

_POSITION_NAMES: dict[int, list[list[str]]] = {
    2: [["top left", "top right"], ["bottom left", "bottom right"]],
    3: [
        ["top left", "top middle", "top right"],
        ["middle left", "center", "middle right"],
        ["bottom left", "bottom middle", "bottom right"],
    ],
}

_QUESTION_TEMPLATES: dict[str, str] = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is at the {position}?",
    "position": "Where is the {colour} {shape}?",
    "count": "How many shapes are there?",
}


def position_names(grid_size: int = 3) -> list[str]:
    """Return the position names of a ``grid_size`` x ``grid_size`` grid, row by row."""
    if grid_size not in _POSITION_NAMES:
        raise ValueError(f"grid_size must be 2 or 3, got {grid_size}")
    return [name for row in _POSITION_NAMES[grid_size] for name in row]


def shapes_vocabulary(grid_size: int = 3, max_shapes: int = 4) -> list[str]:
    """Every text snippet the shapes set can produce: questions, answers and their words."""
    snippets: list[str] = []
    for template in _QUESTION_TEMPLATES.values():
        snippets.append(template.replace("{", "").replace("}", ""))
    snippets += list(COLOURS) + list(SHAPES) + position_names(grid_size)
    snippets += list(COUNT_WORDS[1 : max_shapes + 1])
    return snippets


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _train_tokenizer(words: Iterable[str]):
    """Train a small byte-level BPE with Qwen2's normaliser, pre-tokeniser and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()

    # Each snippet is fed at the start of a line and after a space (with and without a capital),
    # so that both "What" and " what" end up as single tokens; sorted for a stable corpus order.
    corpus: set[str] = set()
    for snippet in [*_BASE_CORPUS, *words]:
        for text in {snippet, snippet.lower(), snippet[:1].upper() + snippet[1:]}:
            corpus.add(text)
            corpus.add(" " + text)
    # min_frequency=1 with a generous cap keeps merging until every seen word is one token.
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sorted(corpus), trainer)
    return tokenizer


def write_tiny_model_dir(
    out_dir: str | Path,
    tokenizer_words: Iterable[str],
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1_000_000.0,
    vision_hidden_size: int = 64,
    vision_depth: int = 2,
    vision_num_heads: int = 4,
    vision_intermediate_size: int = 128,
    out_hidden_size: int | None = None,
    fullatt_block_indexes: list[int] | None = None,
    window_size: int = 112,
    tokens_per_second: int = 2,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 256,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    vocab_multiple: int = 64,
    text_config_overrides: dict[str, Any] | None = None,
    vision_config_overrides: dict[str, Any] | None = None,
    config_transform: Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> Path:
    """Write a weightless Hugging Face-format Qwen2.5-VL model directory.

    Writes ``config.json`` (transformers-5 layout with nested ``text_config``/``vision_config``),
    ``generation_config.json``, ``tokenizer.json`` + ``tokenizer_config.json`` (byte-level BPE
    trained on ``tokenizer_words`` plus chat roles, with the Qwen-VL chat template) and
    ``preprocessor_config.json`` for the Qwen2-VL image processor. The text vocabulary is the
    tokenizer size rounded up to ``vocab_multiple``. ``*_overrides`` are merged into the nested
    configs last, for keys without a dedicated argument. ``config_transform`` turns that Qwen2.5-VL
    ``config.json`` and ``preprocessor_config.json`` into another family's (a family's
    ``shapes_config``: ``(config, preprocessor) -> (config, preprocessor)``) before they are
    written. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(tokenizer_words)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    vocab_size = _round_up(tokenizer.get_vocab_size(), vocab_multiple)

    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            "hidden_size must divide by num_attention_heads, which must divide by num_key_value_heads"
        )
    head_dim = hidden_size // num_attention_heads
    # Qwen2.5-VL splits the rotary half-dim into (temporal, height, width) sections in the ratio
    # 16:24:24 (for head_dim 128); keep that shape for any head size.
    half = head_dim // 2
    t_sec = max(1, half // 4)
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    if fullatt_block_indexes is None:
        fullatt_block_indexes = [vision_depth - 1]

    text_config: dict[str, Any] = {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": num_hidden_layers,
        "layer_types": ["full_attention"] * num_hidden_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": "float32",
    }
    text_config.update(text_config_overrides or {})
    vision_config: dict[str, Any] = {
        "model_type": "qwen2_5_vl_vision",
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "hidden_act": "silu",
        "intermediate_size": vision_intermediate_size,
        "num_heads": vision_num_heads,
        "in_channels": 3,
        "patch_size": patch_size,
        "spatial_merge_size": spatial_merge_size,
        "temporal_patch_size": temporal_patch_size,
        "tokens_per_second": tokens_per_second,
        "window_size": window_size,
        "out_hidden_size": out_hidden_size if out_hidden_size is not None else text_config["hidden_size"],
        "fullatt_block_indexes": list(fullatt_block_indexes),
        "initializer_range": initializer_range,
    }
    vision_config.update(vision_config_overrides or {})
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": "float32",
    }
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "resample": 3,  # bicubic, as the released Qwen2-VL processors use
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": spatial_merge_size,
    }
    if config_transform is not None:
        config, preprocessor = config_transform(config, preprocessor)
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", preprocessor)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": False,
        },
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": max_position_embeddings,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "errors": "replace",
            "added_tokens_decoder": {
                str(ids[tok]): {
                    "content": tok,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                    "special": True,
                }
                for tok in SPECIAL_TOKENS
            },
            "chat_template": QWEN_VL_CHAT_TEMPLATE,
        },
    )
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with outer radius r."""
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if kind == "cross":
        w = r * 0.33
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {kind!r}")


def _draw_scene(
    objects: list[dict[str, Any]], image_size: int, grid_size: int, background: int, rng
) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    cell = image_size / grid_size
    for obj in objects:
        row, col = divmod(obj["cell"], grid_size)
        # Small jitter in size and placement so the model cannot key on exact pixels, while the
        # shape always stays inside its own cell (and so never overlaps another shape).
        r = cell * rng.uniform(0.30, 0.40)
        slack = cell / 2 - r
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_shape_polygon(obj["shape"], cx, cy, r), fill=colour)
    return img


def _make_question(objects: list[dict[str, Any]], qtype: str, rng) -> tuple[str, str]:
    target = objects[int(rng.integers(len(objects)))]
    if qtype == "colour":
        return _QUESTION_TEMPLATES["colour"].format(shape=target["shape"]), target["colour"]
    if qtype == "shape":
        return _QUESTION_TEMPLATES["shape"].format(position=target["position"]), target["shape"]
    if qtype == "position":
        q = _QUESTION_TEMPLATES["position"].format(colour=target["colour"], shape=target["shape"])
        return q, target["position"]
    return _QUESTION_TEMPLATES["count"], COUNT_WORDS[len(objects)]


# Columns of the MMBench-style evaluation TSV (read by openspeed/eval/tsv.py).
TSV_COLUMNS: tuple[str, ...] = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")


def answer_choices(grid_size: int = 2, max_shapes: int = 3) -> dict[str, list[str]]:
    """Every possible answer of each question type: the closed sets multiple-choice options come from.

    Counts run up to at least "four", so every type offers four options.
    """
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "position": position_names(grid_size),
        "count": list(COUNT_WORDS[1 : max(max_shapes, 4) + 1]),
    }


def write_shapes_tsv(
    records: Iterable[dict[str, Any]],
    root: str | Path,
    path: str | Path,
    *,
    grid_size: int = 2,
    max_shapes: int = 3,
    seed: int = 0,
    num_options: int = 4,
) -> Path:
    """Write shapes records as an MMBench-style multiple-choice TSV (``openspeed eval``'s input).

    One row per record: ``index`` (the image number), the first question without its ``<image>``
    tag, an empty ``hint``, options ``A``..``D`` (the answer and ``num_options - 1`` other answers of
    the same question type from :func:`answer_choices`, in an order drawn from ``seed``), ``answer``
    (the right option's letter), ``category`` (the question type) and ``image`` (the PNG file's bytes,
    base64). Images are read relative to ``root``. Returns ``path``.
    """
    if not 2 <= num_options <= 4:
        raise ValueError(f"num_options must be 2..4, got {num_options}")
    # A stream of its own, so the images and questions of a seed never depend on the TSV.
    rng = np.random.default_rng([seed, 1])
    choices = answer_choices(grid_size, max_shapes)
    letters = TSV_COLUMNS[3:7]
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for rec in records:
            answer, qtype = str(rec["answer"]), str(rec["qtype"])
            others = [c for c in choices[qtype] if c != answer]
            picked = [others[int(k)] for k in rng.choice(len(others), size=num_options - 1, replace=False)]
            options = [[answer, *picked][int(k)] for k in rng.permutation(num_options)]
            question = rec["messages"][0]["content"].replace("<image>", "")
            image = base64.b64encode((Path(root) / rec["images"][0]).read_bytes()).decode("ascii")
            index = int(str(rec["id"]).rsplit("-", 1)[-1])
            cells = options + [""] * (len(letters) - num_options)
            writer.writerow([index, question, "", *cells, letters[options.index(answer)], qtype, image])
    return path


def make_shapes_dataset(
    out_dir: str | Path,
    num: int,
    seed: int = 0,
    image_size: int = 112,
    val_fraction: float = 0.1,
    model_kwargs: dict[str, Any] | None = None,
    *,
    grid_size: int = 2,
    max_shapes: int = 3,
    train_turns: int = 1,
    config_transform: Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Generate the synthetic shapes VQA set: ``num`` images with one question each.

    Writes ``images/NNNNNN.png``, ``train.jsonl`` and ``val.jsonl`` (the last
    ``round(num * val_fraction)`` images), ``eval.tsv`` (the validation questions as multiple
    choice, see :func:`write_shapes_tsv`) and ``model/`` via :func:`write_tiny_model_dir`
    (``model_kwargs`` and ``config_transform`` are passed through). Each image holds 1..``max_shapes`` shapes of distinct
    kinds (so "the triangle" is unambiguous) on distinct cells of a ``grid_size`` grid. Records
    carry ``messages``, ``images``, ``qtype``, ``answer``, ``id`` and the ``scene``.
    With ``train_turns > 1`` each training record asks up to that many questions (of different
    types) about its image in one conversation; validation records always ask one.
    Deterministic for a given seed. Returns a dict of the written paths and split sizes.
    """
    if num < 1:
        raise ValueError("num must be >= 1")
    if not 1 <= max_shapes <= min(len(SHAPES), grid_size * grid_size):
        raise ValueError(f"max_shapes must be in 1..{min(len(SHAPES), grid_size * grid_size)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    positions = position_names(grid_size)
    colour_names = list(COLOURS)
    # Question types are balanced exactly, then shuffled, so small val splits cover all four.
    qtypes = [QTYPES[i % len(QTYPES)] for i in range(num)]
    qtypes = [qtypes[i] for i in rng.permutation(num)]

    num_val = min(num - 1, round(num * val_fraction)) if num > 1 else 0
    num_train = num - num_val
    records = []
    for i in range(num):
        n_obj = int(rng.integers(1, max_shapes + 1))
        kinds = rng.choice(len(SHAPES), size=n_obj, replace=False)
        cells = rng.choice(grid_size * grid_size, size=n_obj, replace=False)
        objects = [
            {
                "shape": SHAPES[int(k)],
                "colour": colour_names[int(rng.integers(len(colour_names)))],
                "cell": int(c),
                "position": positions[int(c)],
            }
            for k, c in zip(kinds, cells, strict=True)
        ]
        background = int(rng.integers(20, 70))
        img = _draw_scene(objects, image_size, grid_size, background, rng)
        rel = f"images/{i:06d}.png"
        img.save(out / rel, compress_level=1)
        question, answer = _make_question(objects, qtypes[i], rng)
        messages = [
            {"role": "user", "content": "<image>" + question},
            {"role": "assistant", "content": answer},
        ]
        if i < num_train and train_turns > 1:
            # Follow-up questions about the same image: several answers per vision forward.
            others = [q for q in QTYPES if q != qtypes[i]]
            for qtype in [others[int(k)] for k in rng.permutation(len(others))][: train_turns - 1]:
                follow_q, follow_a = _make_question(objects, qtype, rng)
                messages += [{"role": "user", "content": follow_q}, {"role": "assistant", "content": follow_a}]
        records.append(
            {
                "id": f"shapes-{i:06d}",
                "messages": messages,
                "images": [rel],
                "qtype": qtypes[i],
                "answer": answer,
                "scene": [{k: o[k] for k in ("shape", "colour", "position")} for o in objects],
            }
        )

    for name, part in (("train.jsonl", records[:num_train]), ("val.jsonl", records[num_train:])):
        with open(out / name, "w", encoding="utf-8") as f:
            for rec in part:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    eval_tsv = write_shapes_tsv(records[num_train:], out, out / "eval.tsv", grid_size=grid_size,
                                max_shapes=max_shapes, seed=seed)

    model_dir = write_tiny_model_dir(
        out / "model", shapes_vocabulary(grid_size, max_shapes), config_transform=config_transform,
        **(model_kwargs or {})
    )
    return {
        "root": out,
        "train": out / "train.jsonl",
        "val": out / "val.jsonl",
        "eval_tsv": eval_tsv,
        "images": out / "images",
        "model_dir": model_dir,
        "num_train": num_train,
        "num_val": num_val,
    }
