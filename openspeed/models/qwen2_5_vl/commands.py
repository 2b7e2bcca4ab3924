"""Qwen2.5-VL's command-line pieces: the synthetic shapes VQA set (``data.generate: shapes`` and
``openspeed data shapes``). Light at import; each imports what it needs when called."""

from __future__ import annotations

import os
import sys

from openspeed.commands import ArgParser
from openspeed.errors import OpenSpeedError
from openspeed.models.families import Command

# The data.generate_* keys the shapes generator reads (besides generate_dir and generate_num).
SHAPES_KEYS = ("generate_turns", "generate_val_num", "generate_text_layers", "generate_vision_width")


def shapes_config(config: dict, preprocessor: dict) -> tuple[dict, dict]:
    """The shapes set's tiny model files: the set writes Qwen2.5-VL's, so as they are."""
    return config, preprocessor


def prepare_shapes(cfg, config_transform=shapes_config) -> None:
    """``data.generate: shapes``: the shapes VQA set and its tiny model directory, once.

    ``config_transform`` turns the set's Qwen2.5-VL model config into another family's (a family's
    ``shapes_config``)."""
    if os.path.exists(cfg.data.train_path):
        return
    data = cfg.data
    out_dir = data.generate_dir or os.path.dirname(os.path.abspath(data.train_path))
    print(f"generating the shapes demo set ({data.generate_num} samples) in {out_dir}", file=sys.stderr)
    from openspeed.data.shapes import make_shapes_dataset

    val_fraction = 0.1 if data.generate_val_num is None else data.generate_val_num / max(1, data.generate_num)
    model_kwargs = {
        "num_hidden_layers": data.generate_text_layers,
        "vision_hidden_size": data.generate_vision_width,
        "vision_intermediate_size": 2 * data.generate_vision_width,
    }
    make_shapes_dataset(out_dir, num=data.generate_num, seed=0, val_fraction=val_fraction,
                        model_kwargs=model_kwargs, train_turns=data.generate_turns,
                        config_transform=config_transform)


def _shapes(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed data shapes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--family", default="qwen2_5_vl", help="the family of the tiny model directory")
    ns = parser.parse_args(args)
    if ns.num < 2:
        raise OpenSpeedError(f"--num: need at least 2 samples, got {ns.num}")
    from openspeed.models.families import families, get_family

    family = get_family(ns.family)
    if family.shapes_config is None:
        able = ", ".join(f.name for f in families() if f.shapes_config is not None)
        raise OpenSpeedError(f"--family: {ns.family} cannot train on the shapes set (families that can: {able})")
    from openspeed.data.shapes import make_shapes_dataset

    make_shapes_dataset(ns.out, num=ns.num, seed=ns.seed, image_size=ns.image_size,
                        config_transform=family.shapes_config)
    print(f"wrote {ns.num} samples, a tiny {family.name} model directory and eval.tsv (held-out multiple "
          f"choice) to {ns.out}")
    return 0


SHAPES = Command(
    "shapes",
    "  data shapes --out DIR [--num N] [--family F]  write the synthetic shapes VQA set and a tiny model dir\n",
    _shapes,
)
