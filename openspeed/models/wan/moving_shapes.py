"""The "moving shapes" text-to-video demo set, and a checker that scores a clip against its caption.

Each clip shows one coloured shape on black moving in a straight line at constant speed; its caption
names the colour, the shape and the direction: ``"a red square moves right"``. By default the path
is fixed by the direction (the shape crosses the frame through its centre, from one side to the
other) up to a small random offset (``jitter`` pixels across and along the path), so a caption
almost determines its clip, which is what a tiny model can learn in minutes on a CPU.

:func:`score_clip` reads a clip back: the dominant colour is the palette colour most of the coloured
pixels are closest to; the direction is that of the least-squares line through the per-frame centres
of mass of the coloured pixels (a centre that moves less than ``min_motion`` of the frame is
"static", which matches no caption).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (235, 215, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
# Pixels count as "coloured" when their brightest channel exceeds this (the background is black).
COLOURED_THRESHOLD = 80
# Drawing resolution multiplier: shapes are drawn large and box-filtered down (soft, sub-pixel edges).
SUPERSAMPLE = 4


def caption_for(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moves {direction}"


def vocabulary() -> list[str]:
    """Every word of the captions (for the tokenizer)."""
    return sorted({"a", "moves", *COLOURS, *SHAPES, *DIRECTIONS})


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """(colour, direction) named by a caption (``None`` where it names none)."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    return colour, direction


def _shape_mask(shape: str, cx: float, cy: float, size: float, height: int, width: int) -> np.ndarray:
    """Coverage (height, width) in [0, 1] of a shape of ``size`` pixels centred at (cx, cy)."""
    s = SUPERSAMPLE
    ys, xs = np.mgrid[0 : height * s, 0 : width * s]
    x = (xs + 0.5) / s - cx
    y = (ys + 0.5) / s - cy
    r = size / 2
    if shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "triangle":  # pointing up, base at the bottom
        inside = (y <= r) & (y >= -r) & (np.abs(x) <= (y + r) / 2)
    else:
        raise ValueError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render_clip(
    colour: str,
    shape: str,
    direction: str,
    *,
    frames: int = 8,
    height: int = 16,
    width: int = 16,
    size: float | None = None,
    speed: float | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """One clip (frames, height, width, 3) uint8.

    The shape's centre moves ``speed`` pixels per frame in ``direction`` and passes the frame's centre
    (shifted by ``offset`` = (across, along) the path) half-way through the clip. ``size`` defaults to
    3/8 of the shorter side; ``speed`` to what carries the shape from one edge to the other.
    """
    size = size if size is not None else 3 * min(height, width) / 8
    dx, dy = DIRECTIONS[direction]
    extent = width if dx else height
    if speed is None:
        speed = (extent - size) / max(1, frames - 1)
    across, along = offset
    cx0 = width / 2 + (across if dy else along)
    cy0 = height / 2 + (across if dx else along)
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    clip = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for k in range(frames):
        t = (k - (frames - 1) / 2) * speed
        mask = _shape_mask(shape, cx0 + dx * t, cy0 + dy * t, size, height, width)
        clip[k] = np.clip(mask[..., None] * rgb + 0.5, 0, 255).astype(np.uint8)
    return clip


def make_moving_shapes(
    out_dir: str | os.PathLike,
    num: int = 2000,
    *,
    frames: int = 4,
    height: int = 16,
    width: int = 16,
    seed: int = 0,
    jitter: float = 3.0,
    speed: float | None = None,
    fps: int = 8,
    jsonl: str | os.PathLike | None = None,
) -> Path:
    """Write ``num`` clips (lossless FFV1 ``.mkv``) under ``out_dir`` and their captions; returns the JSONL.

    The JSONL is ``jsonl`` (default ``out_dir/train.jsonl``), its video paths relative to its folder.

    Colour, shape and direction cycle through every combination in a seeded order; ``jitter`` is the
    largest random offset (pixels) across and along the path.
    """
    from openspeed.data.video_text import write_video

    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    path = Path(jsonl) if jsonl is not None else out / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    records = []
    for i in range(num):
        if i % len(combos) == 0:
            order = rng.permutation(len(combos))
        colour, shape, direction = combos[order[i % len(combos)]]
        offset = tuple(float(v) for v in rng.uniform(-jitter, jitter, size=2)) if jitter > 0 else (0.0, 0.0)
        clip = render_clip(colour, shape, direction, frames=frames, height=height, width=width,
                           speed=speed, offset=offset)
        video = out / "clips" / f"{i:06d}.mkv"
        write_video(video, clip, fps=fps)
        rel = os.path.relpath(video.resolve(), path.parent.resolve())
        records.append({"video": rel, "caption": caption_for(colour, shape, direction)})
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


def prepare_demo(cfg) -> None:
    """``data.generate: moving_shapes``: make the clips and the tiny pipeline a run needs, once.

    The clips (``data.generate_num`` of them, ``wan.generate_jitter``) match the first of
    ``wan.video_buckets`` and are written beside ``data.train_path`` (or in ``data.generate_dir``).
    When ``model.path`` does not exist a tiny random pipeline is written there (pixel space with
    ``wan.vae: identity``), its DiT configured by ``wan.generate_dit``, without transformer weights:
    the trainer initialises the DiT from ``train.seed``.
    """
    import sys

    from openspeed.data.video_text import parse_buckets
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline

    data, wan = cfg.data, cfg.wan
    if not os.path.exists(data.train_path):
        frames, height, width = parse_buckets(wan.video_buckets, "wan.video_buckets")[0]
        out_dir = data.generate_dir or os.path.dirname(os.path.abspath(data.train_path))
        print(f"generating the moving-shapes demo set ({data.generate_num} clips of {frames}x{height}x{width}) "
              f"in {out_dir}", file=sys.stderr)
        make_moving_shapes(out_dir, data.generate_num, frames=frames, height=height, width=width,
                           seed=cfg.train.seed, jitter=wan.generate_jitter, jsonl=data.train_path)
    if cfg.model.path and not os.path.exists(cfg.model.path):
        print(f"writing a tiny Wan2.1 pipeline to {cfg.model.path}", file=sys.stderr)
        write_tiny_wan_pipeline(cfg.model.path, pixel_space=wan.vae == "identity", seed=cfg.train.seed,
                                words=vocabulary(), transformer=dict(wan.generate_dit),
                                transformer_weights=False, flow_shift=wan.flow_shift)


def eval_prompts(num: int, seed: int = 1) -> list[str]:
    """``num`` captions balanced over directions (and spread over colours and shapes), seeded order."""
    rng = np.random.default_rng(seed)
    colours, shapes, directions = list(COLOURS), list(SHAPES), list(DIRECTIONS)
    prompts = []
    colour_order = rng.permutation(len(colours))
    for i in range(num):
        direction = directions[i % len(directions)]
        colour = colours[colour_order[(i // len(directions) + i) % len(colours)]]
        shape = shapes[int(rng.integers(len(shapes)))]
        prompts.append(caption_for(colour, shape, direction))
    return prompts


# --------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------


def dominant_colour(clip: np.ndarray) -> str | None:
    """The palette colour closest to most coloured pixels of the clip (brightness-weighted), or None."""
    pixels = clip.reshape(-1, 3).astype(np.float32)
    bright = pixels.max(axis=1)
    keep = bright > COLOURED_THRESHOLD
    if not keep.any():
        return None
    pixels, weight = pixels[keep], bright[keep]
    # Compare chromaticity (colour direction), so dim edge pixels vote for their hue.
    unit = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    nearest = np.argmax(unit @ palette.T, axis=1)
    votes = np.bincount(nearest, weights=weight, minlength=len(palette))
    return list(COLOURS)[int(votes.argmax())]


def centres_of_mass(clip: np.ndarray) -> list[tuple[int, float, float]]:
    """(frame, x, y) centre of the coloured pixels of each frame that has any."""
    out = []
    frames, height, width, _ = clip.shape
    ys, xs = np.mgrid[0:height, 0:width]
    for k in range(frames):
        bright = clip[k].max(axis=2).astype(np.float32)
        weight = np.where(bright > COLOURED_THRESHOLD, bright, 0.0)
        total = weight.sum()
        if total > 0:
            out.append((k, float((weight * xs).sum() / total), float((weight * ys).sum() / total)))
    return out


def motion_direction(clip: np.ndarray, min_motion: float = 0.15) -> str:
    """``right``/``left``/``up``/``down`` from the fitted centre path, or ``static`` / ``unknown``.

    The path's displacement over the clip must be at least ``min_motion`` of the frame size on its
    main axis, else the clip is ``static``; with fewer than two frames showing the shape it is
    ``unknown``.
    """
    centres = centres_of_mass(clip)
    if len(centres) < 2:
        return "unknown"
    k = np.array([c[0] for c in centres], dtype=np.float64)
    x = np.array([c[1] for c in centres])
    y = np.array([c[2] for c in centres])
    span = clip.shape[0] - 1
    vx = np.polyfit(k, x, 1)[0] * span
    vy = np.polyfit(k, y, 1)[0] * span
    _, height, width, _ = clip.shape
    if abs(vx) / width >= abs(vy) / height:
        if abs(vx) < min_motion * width:
            return "static"
        return "right" if vx > 0 else "left"
    if abs(vy) < min_motion * height:
        return "static"
    return "down" if vy > 0 else "up"


def score_clip(clip: np.ndarray, caption: str) -> dict[str, Any]:
    """Colour and direction of a (frames, H, W, 3) uint8 clip against its caption."""
    want_colour, want_direction = parse_caption(caption)
    colour = dominant_colour(clip)
    direction = motion_direction(clip)
    return {
        "caption": caption,
        "colour": colour,
        "direction": direction,
        "colour_ok": colour is not None and colour == want_colour,
        "direction_ok": direction == want_direction,
    }


def summarise_scores(scores: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts and rates of correct colours and directions (direction chance: 1 in 4)."""
    scores = list(scores)
    n = len(scores)
    colour = sum(bool(s["colour_ok"]) for s in scores)
    direction = sum(bool(s["direction_ok"]) for s in scores)
    return {
        "n": n,
        "colour_correct": colour,
        "direction_correct": direction,
        "colour_rate": colour / n if n else 0.0,
        "direction_rate": direction / n if n else 0.0,
        "direction_chance": 1 / len(DIRECTIONS),
        "colour_chance": 1 / len(COLOURS),
    }


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "caption_for",
    "centres_of_mass",
    "dominant_colour",
    "eval_prompts",
    "make_moving_shapes",
    "motion_direction",
    "parse_caption",
    "prepare_demo",
    "render_clip",
    "score_clip",
    "summarise_scores",
    "vocabulary",
]
