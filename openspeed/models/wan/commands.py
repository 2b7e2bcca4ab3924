"""Wan's command-line verbs: ``openspeed generate`` and its ``openspeed data`` sub-commands.

Light at import (the families' registry reads it before torch); each verb imports what it needs.
"""

from __future__ import annotations

import os

from openspeed.commands import (
    ArgParser,
    add_device_option,
    check_paths,
    check_writable,
    drop_option,
    launch,
    under_launcher,
)
from openspeed.errors import OpenSpeedError
from openspeed.models.families import Command


def prepare_moving_shapes(cfg) -> None:
    """``data.generate: moving_shapes``: the clips and tiny pipeline of the text-to-video demo."""
    from openspeed.models.wan.moving_shapes import prepare_demo

    prepare_demo(cfg)


def _generate(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed generate")
    parser.add_argument("--checkpoint", required=True, help="run directory or one of its checkpoints")
    parser.add_argument("--prompt", action="append", default=[], help="caption (repeat for several)")
    parser.add_argument("--prompts", help="text file, one caption per line")
    parser.add_argument("--eval-prompts", type=int, default=0,
                        help="N balanced moving-shapes prompts (seeded by --prompt-seed); implies --score")
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--image", action="append", default=[], help="first frame (image-to-video)")
    parser.add_argument("--out", required=True, help="out.mp4 for one prompt, a directory for several")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=None, help="default: the run's wan.flow_shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score", action="store_true", help="score colour and motion (moving-shapes checker)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights even if EMA exists")
    parser.add_argument("--nproc", type=int, help="processes to split the video tokens over (Ulysses)")
    add_device_option(parser)
    ns = parser.parse_args(args)
    if ns.nproc is not None and ns.nproc < 1:
        raise OpenSpeedError(f"--nproc: expected a positive integer, got {ns.nproc}")
    prompts = list(ns.prompt)
    if ns.prompts:
        if not os.path.isfile(ns.prompts):
            raise OpenSpeedError(f"file not found: {ns.prompts}")
        with open(ns.prompts, encoding="utf-8") as fh:
            prompts += [line.strip() for line in fh if line.strip()]
    if ns.eval_prompts:
        from openspeed.models.wan.moving_shapes import eval_prompts

        prompts += eval_prompts(ns.eval_prompts, ns.prompt_seed)
    if not prompts:
        raise OpenSpeedError("openspeed generate: give --prompt, --prompts FILE or --eval-prompts N")
    for path in ns.image:
        if not os.path.isfile(path):
            raise OpenSpeedError(f"file not found: {path}")
    if not os.path.isdir(ns.checkpoint):
        raise OpenSpeedError(f"--checkpoint: run directory not found: {ns.checkpoint}")
    if ns.batch_size < 1:
        raise OpenSpeedError(f"--batch-size: must be at least 1, got {ns.batch_size}")
    # One prompt with a file name writes that file; otherwise --out is the folder of the clips.
    check_writable(ns.out, directory=not (len(prompts) == 1 and not os.path.isdir(ns.out)
                                          and os.path.splitext(ns.out)[1]))
    if under_launcher():  # a worker of --nproc, or of the user's torchrun: run_generate reads WORLD_SIZE
        if ns.nproc is not None and ns.nproc != int(os.environ["WORLD_SIZE"]):
            raise OpenSpeedError(f"--nproc {ns.nproc} differs from the launcher's {os.environ['WORLD_SIZE']} processes")
    from openspeed.models.wan.generate import run_generate, sampling_device

    # A device this machine lacks is one line here, before any process is launched or model loaded.
    sampling_device(ns.device, int(os.environ["WORLD_SIZE"]) if under_launcher() else ns.nproc or 1)
    if not under_launcher() and ns.nproc and ns.nproc > 1:
        return launch(ns.nproc, drop_option(args, "--nproc"), command="generate")

    summary = run_generate(
        ns.checkpoint, prompts, ns.out, image_paths=ns.image, score=ns.score or bool(ns.eval_prompts),
        ema=False if ns.no_ema else None, frames=ns.frames, height=ns.height, width=ns.width, steps=ns.steps,
        guidance=ns.guidance, shift=ns.shift, seed=ns.seed, negative_prompt=ns.negative_prompt,
        batch_size=ns.batch_size, device=ns.device,
    )
    for clip in summary["clips"]:
        line = f"{clip['video']}  {clip['prompt']!r}"
        if "colour" in clip:
            line += f"  -> colour {clip['colour']} ({'ok' if clip['colour_ok'] else 'wrong'}), " \
                    f"direction {clip['direction']} ({'ok' if clip['direction_ok'] else 'wrong'})"
        print(line)
    if "scores" in summary:
        s = summary["scores"]
        print(f"colour {s['colour_correct']}/{s['n']} (chance {s['colour_chance']:.2f}), direction "
              f"{s['direction_correct']}/{s['n']} (chance {s['direction_chance']:.2f}); step {summary['step']}"
              f"{', EMA weights' if summary['ema'] else ''}")
    return 0


def _tiny_pipeline(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed data tiny-wan-pipeline")
    parser.add_argument("--out", required=True)
    parser.add_argument("--i2v", action="store_true", help="image-to-video (adds the CLIP image encoder)")
    parser.add_argument("--pixel-space", action="store_true", help="a DiT for wan.vae=identity")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    check_writable(ns.out)
    from openspeed.models.wan.moving_shapes import vocabulary
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline

    write_tiny_wan_pipeline(ns.out, image_to_video=ns.i2v, pixel_space=ns.pixel_space, seed=ns.seed,
                            words=vocabulary())
    print(f"wrote a tiny {'image' if ns.i2v else 'text'}-to-video Wan2.1 pipeline to {ns.out}")
    return 0


def _moving_shapes(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed data moving-shapes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="height and width in pixels")
    parser.add_argument("--jitter", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    if ns.num < 1 or ns.frames < 2 or ns.size < 4:
        raise OpenSpeedError("moving-shapes: need --num >= 1, --frames >= 2 and --size >= 4")
    check_writable(ns.out)
    from openspeed.models.wan.moving_shapes import make_moving_shapes

    path = make_moving_shapes(ns.out, ns.num, frames=ns.frames, height=ns.size, width=ns.size, seed=ns.seed,
                              jitter=ns.jitter)
    print(f"wrote {ns.num} clips and {path}")
    return 0


def _extract_features(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed data extract-features")
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-samples", type=int, default=256)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    ns = parser.parse_args(args)
    check_writable(ns.out)
    from openspeed.commands import prepare_data
    from openspeed.config import load_config

    cfg = load_config(ns.config, ns.overrides)
    prepare_data(cfg)
    check_paths(cfg)
    if cfg.family != "wan":
        raise OpenSpeedError(f"data extract-features: {cfg.model.path} is a {cfg.family} model, not a Wan pipeline")
    from openspeed.models.wan.extract import extract_features

    done = extract_features(cfg, ns.out, shard_samples=max(1, ns.shard_samples))
    print(f"wrote features of {done['samples']} samples ({done['skipped']} skipped) to {done['out']}; "
          f"train with data.train_path={os.path.join(done['out'], 'index.jsonl')}")
    return 0


GENERATE = Command(
    "generate",
    '  generate --checkpoint RUN_DIR --prompt "..." [--image first.png] --out out.mp4 [--nproc N]\n'
    "           [--device auto|cpu|cuda[:N]|npu[:N]]\n"
    "                                              sample videos from a trained Wan run (MP4 + PNG frames);\n"
    "                                              --nproc splits the video tokens over N processes\n",
    _generate,
)
TINY_PIPELINE = Command(
    "tiny-wan-pipeline",
    "  data tiny-wan-pipeline --out DIR [--i2v]    write a tiny random diffusers-format Wan2.1 pipeline\n",
    _tiny_pipeline,
)
MOVING_SHAPES = Command(
    "moving-shapes",
    "  data moving-shapes --out DIR [--num N]      write the moving-shapes text-to-video demo clips\n",
    _moving_shapes,
)
EXTRACT_FEATURES = Command(
    "extract-features",
    "  data extract-features CONFIG --out DIR      encode a Wan run's videos and captions once (VAE, UMT5)\n",
    _extract_features,
)
