"""``openspeed`` command line: train | data.

Everything a user can get wrong is checked before torch is imported and reported as one line on
stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from openspeed.errors import OpenSpeedError

USAGE = """usage: openspeed <command> ...

commands:
  train CONFIG [--nproc N] [key=value ...]   train a model (see docs/config.md)
  chat --checkpoint RUN_DIR [--image IMG ...] "question"
                                              answer a question about images with a trained run
  chat --checkpoint RUN_DIR --questions FILE.jsonl [--out FILE.jsonl]
                                              answer a batch of questions, write JSONL
  convert RUN_DIR --to hf --out DIR [--max-shard-size 2GB]
                                              export a run's latest checkpoint in Hugging Face format
                                              (a LoRA run merged; also --merge-lora)
  convert RUN_DIR --to peft --out DIR         a LoRA run's adapter for peft over its model.path
  eval --checkpoint RUN_DIR --data FILE.tsv [--out DIR] [--batch-size N] [--max-new-tokens N] [--limit N]
       [--prompt choices|question]          accuracy on an MMBench-style TSV (see docs/evaluation.md)
  data shapes --out DIR [--num N]             write the synthetic shapes VQA set and a tiny model dir
  generate --checkpoint RUN_DIR --prompt "..." [--image first.png] --out out.mp4 [--nproc N]
                                              sample videos from a trained Wan run (MP4 + PNG frames);
                                              --nproc splits the video tokens over N processes
  convert RUN_DIR --merge-lora --out DIR      a Wan run's DiT with its LoRA merged, in diffusers format
  data tiny-wan-pipeline --out DIR [--i2v]    write a tiny random diffusers-format Wan2.1 pipeline
  data moving-shapes --out DIR [--num N]      write the moving-shapes text-to-video demo clips
  data extract-features CONFIG --out DIR      encode a Wan run's videos and captions once (VAE, UMT5)
"""

EXIT_USER_ERROR = 2
ERROR_FILE_ENV = "OPENSPEED_ERROR_FILE"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE, end="")
            return 0 if argv else EXIT_USER_ERROR
        command, rest = argv[0], argv[1:]
        if command == "train":
            return cmd_train(rest)
        if command == "data":
            return cmd_data(rest)
        if command == "chat":
            return cmd_chat(rest)
        if command == "convert":
            return cmd_convert(rest)
        if command == "generate":
            return cmd_generate(rest)
        if command == "eval":
            return cmd_eval(rest)
        raise OpenSpeedError(f"unknown command '{command}' (commands: train, chat, eval, generate, convert, data)")
    except OpenSpeedError as exc:
        report_user_error(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def report_user_error(message: str) -> None:
    """Print the one-line error; inside a launched worker, hand it to the launcher instead."""
    line = " ".join(message.split())
    error_file = os.environ.get(ERROR_FILE_ENV)
    rank = int(os.environ.get("RANK", "0"))
    if error_file:
        with open(f"{error_file}.{rank}", "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
        return
    if rank == 0:
        print(f"error: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- train


def parse_train_args(args: list[str]) -> tuple[str, int | None, list[str]]:
    """Split ``CONFIG [options] [key=value ...]`` (options and overrides in any order)."""
    from openspeed.config import FLAG_ALIASES

    if not args or args[0].startswith("-"):
        raise OpenSpeedError("usage: openspeed train CONFIG [--nproc N] [key=value ...]")
    config_path, rest = args[0], args[1:]
    nproc: int | None = None
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--"):
            name, eq, value = item.partition("=")
            if not eq:
                if i + 1 >= len(rest):
                    raise OpenSpeedError(f"option {name} needs a value")
                value = rest[i + 1]
                i += 1
            if name == "--nproc":
                if not value.isdigit() or int(value) < 1:
                    raise OpenSpeedError(f"--nproc: expected a positive integer, got '{value}'")
                nproc = int(value)
            elif name in FLAG_ALIASES:
                overrides.append(f"{FLAG_ALIASES[name]}={value}")
            else:
                raise OpenSpeedError(f"unknown option {name}")
        elif "=" in item:
            overrides.append(item)
        else:
            raise OpenSpeedError(f"unexpected argument '{item}' (overrides look like section.key=value)")
        i += 1
    return config_path, nproc, overrides


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def cmd_train(args: list[str]) -> int:
    from openspeed.config import load_config, resolve_layout

    config_path, nproc, overrides = parse_train_args(args)
    cfg = load_config(config_path, overrides)
    if under_launcher():
        world_size = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != int(os.environ.get("LOCAL_WORLD_SIZE", world_size)):
            raise OpenSpeedError(f"--nproc {nproc} differs from the launcher's {world_size} processes")
    else:
        world_size = nproc or 1
    resolve_layout(cfg, world_size)
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("OPENSPEED_DATA_READY"):
        prepare_data(cfg)
    check_paths(cfg)

    if world_size > 1 and not under_launcher():
        return launch(world_size, [config_path, *overrides])

    from openspeed.training.dit_trainer import is_dit_run, run_dit_training

    if is_dit_run(cfg):  # diffusion transformers (Wan) have their own loop
        run_dit_training(cfg)
        return 0
    from openspeed.training.trainer import run_training

    run_training(cfg)
    return 0


def prepare_data(cfg) -> None:
    """Make the synthetic data a config asks for, once, before any worker starts."""
    if cfg.data.generate == "moving_shapes":
        from openspeed.data.moving_shapes import prepare_demo

        prepare_demo(cfg)
        return
    if cfg.data.generate != "shapes" or os.path.exists(cfg.data.train_path):
        return
    out_dir = cfg.data.generate_dir or os.path.dirname(os.path.abspath(cfg.data.train_path))
    print(f"generating the shapes demo set ({cfg.data.generate_num} samples) in {out_dir}", file=sys.stderr)
    from openspeed.data.shapes import make_shapes_dataset

    data = cfg.data
    val_fraction = 0.1 if data.generate_val_num is None else data.generate_val_num / max(1, data.generate_num)
    model_kwargs = {
        "num_hidden_layers": data.generate_text_layers,
        "vision_hidden_size": data.generate_vision_width,
        "vision_intermediate_size": 2 * data.generate_vision_width,
    }
    make_shapes_dataset(out_dir, num=data.generate_num, seed=0, val_fraction=val_fraction,
                        model_kwargs=model_kwargs, train_turns=data.generate_turns)


def check_paths(cfg) -> None:
    from openspeed.errors import ConfigError

    if not cfg.data.train_path:
        raise ConfigError("data.train_path: not set")
    if not os.path.isfile(cfg.data.train_path):
        raise ConfigError(f"data.train_path: file not found: {cfg.data.train_path}")
    if cfg.data.val_path and not os.path.isfile(cfg.data.val_path):
        raise ConfigError(f"data.val_path: file not found: {cfg.data.val_path}")
    if not cfg.model.path:
        raise ConfigError("model.path: not set")
    if not any(os.path.isfile(os.path.join(cfg.model.path, name)) for name in ("config.json", "model_index.json")):
        raise ConfigError(f"model.path: no config.json in {cfg.model.path}")
    resume = cfg.train.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise ConfigError(f"train.resume: checkpoint directory not found: {resume}")


def launch(nproc: int, worker_args: list[str], command: str = "train") -> int:
    """Run ``nproc`` workers of ``python -m openspeed <command> ...`` under torch's elastic launcher."""
    import logging
    import tempfile

    from openspeed.distributed.launch import run_workers

    with tempfile.TemporaryDirectory(prefix="openspeed-") as tmp:
        error_file = os.path.join(tmp, "error")
        env = {ERROR_FILE_ENV: error_file, "OPENSPEED_DATA_READY": "1"}
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
        exit_code = run_workers(nproc, [sys.executable, "-m", "openspeed", command, *worker_args], env)
        if exit_code == 0:
            return 0
        messages = sorted(f for f in os.listdir(tmp) if f.startswith("error."))
        if messages:
            with open(os.path.join(tmp, messages[0]), encoding="utf-8") as fh:
                print(f"error: {fh.readline().strip()}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        what = "training" if command == "train" else command
        print(f"error: a {what} process failed (exit code {exit_code}); its output is above", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- chat


def cmd_chat(args: list[str]) -> int:
    parser = _ArgParser(prog="openspeed chat")
    parser.add_argument("--checkpoint", required=True, help="run directory or one of its checkpoints")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--questions", help="JSONL of {image(s), question} or conversation records")
    parser.add_argument("--out", help="where --questions answers go (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, help="sample from the top-p nucleus (default: greedy)")
    parser.add_argument("--seed", type=int, help="seed of the sampling, for reproducible answers")
    parser.add_argument("question", nargs="?")
    ns = parser.parse_args(args)
    if (ns.question is None) == (ns.questions is None):
        raise OpenSpeedError("openspeed chat: give either a question or --questions FILE.jsonl")
    if ns.temperature is not None and not ns.temperature > 0:
        raise OpenSpeedError(f"--temperature must be > 0, got {ns.temperature}")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        raise OpenSpeedError(f"--top-p must be in (0, 1], got {ns.top_p}")
    sampling = {"temperature": ns.temperature, "top_p": ns.top_p, "seed": ns.seed}
    for path in [*ns.image, *([ns.questions] if ns.questions else [])]:
        if not os.path.isfile(path):
            raise OpenSpeedError(f"file not found: {path}")
    if not os.path.isdir(ns.checkpoint):
        raise OpenSpeedError(f"--checkpoint: run directory not found: {ns.checkpoint}")

    from openspeed.inference.chat import answer_file, answer_one

    if ns.question is not None:
        print(answer_one(ns.checkpoint, ns.question, ns.image, max_new_tokens=ns.max_new_tokens, **sampling))
        return 0
    count, skipped = answer_file(ns.checkpoint, ns.questions, ns.out, max_new_tokens=ns.max_new_tokens,
                                 batch_size=ns.batch_size, **sampling)
    if ns.out:
        print(f"answered {count} questions ({skipped} skipped) -> {ns.out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- convert


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if unit and number.endswith(unit):
            number, factor = number[: -len(unit)], units[unit]
            break
    else:
        factor = 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise OpenSpeedError(f"--max-shard-size: cannot read '{text}' (e.g. 2GB, 500MB)") from None
    if value < 1:
        raise OpenSpeedError(f"--max-shard-size: must be positive, got '{text}'")
    return value


def cmd_convert(args: list[str]) -> int:
    parser = _ArgParser(prog="openspeed convert")
    parser.add_argument("run_dir", help="run directory or one of its checkpoints")
    parser.add_argument("--to", choices=["hf", "peft"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--merge-lora", action="store_true", help="fold a LoRA run's adapters into the weights")
    parser.add_argument("--ema", action="store_true", help="Wan: export the EMA weights")
    ns = parser.parse_args(args)
    shard = _parse_size(ns.max_shard_size)
    if not os.path.isdir(ns.run_dir):
        raise OpenSpeedError(f"run directory not found: {ns.run_dir}")
    if _is_wan_run_dir(ns.run_dir):
        from openspeed.inference.wan_export import export_wan

        done = export_wan(ns.run_dir, ns.out, merge_lora=ns.merge_lora, ema=True if ns.ema else None,
                          max_shard_size_bytes=shard)
        what = "LoRA adapter (peft format)" if done["kind"] == "adapter" else "diffusers transformer"
        print(f"wrote a {what} of step {done['step']} to {done['out']}")
        return 0
    if ns.ema:
        raise OpenSpeedError("--ema applies to Wan runs only")
    if ns.to == "peft":
        if ns.merge_lora:
            raise OpenSpeedError("--merge-lora writes the merged model (--to hf), not a peft adapter")
        from openspeed.training.export import export_peft

        print(f"wrote a LoRA adapter (peft format) to {export_peft(ns.run_dir, ns.out)}")
        return 0
    if ns.to is None and not ns.merge_lora:
        raise OpenSpeedError("openspeed convert: the following arguments are required: --to")
    from openspeed.training.export import export_hf

    out = export_hf(ns.run_dir, ns.out, max_shard_size_bytes=shard, merge_lora=ns.merge_lora)
    print(f"wrote a Hugging Face-format model to {out}")
    return 0


# ----------------------------------------------------------------------------- data


def cmd_data(args: list[str]) -> int:
    parser = _ArgParser(prog="openspeed data")
    sub = parser.add_subparsers(dest="what", required=True)
    shapes = sub.add_parser("shapes", help="synthetic shapes VQA set plus a tiny model dir")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--num", type=int, default=2000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=112)
    pipe = sub.add_parser("tiny-wan-pipeline", help="tiny random diffusers-format Wan2.1 pipeline")
    pipe.add_argument("--out", required=True)
    pipe.add_argument("--i2v", action="store_true", help="image-to-video (adds the CLIP image encoder)")
    pipe.add_argument("--pixel-space", action="store_true", help="a DiT for model.vae=identity")
    pipe.add_argument("--seed", type=int, default=0)
    moving = sub.add_parser("moving-shapes", help="moving-shapes text-to-video demo clips")
    moving.add_argument("--out", required=True)
    moving.add_argument("--num", type=int, default=2000)
    moving.add_argument("--frames", type=int, default=4)
    moving.add_argument("--size", type=int, default=16, help="height and width in pixels")
    moving.add_argument("--jitter", type=float, default=3.0)
    moving.add_argument("--seed", type=int, default=0)
    extract = sub.add_parser("extract-features", help="encode a Wan run's data once (VAE latents, UMT5)")
    extract.add_argument("config")
    extract.add_argument("--out", required=True)
    extract.add_argument("--shard-samples", type=int, default=256)
    extract.add_argument("overrides", nargs="*", help="section.key=value")
    ns = parser.parse_args(args)
    if ns.what == "tiny-wan-pipeline":
        from openspeed.data.moving_shapes import vocabulary
        from openspeed.data.wan_pipeline import write_tiny_wan_pipeline

        write_tiny_wan_pipeline(ns.out, image_to_video=ns.i2v, pixel_space=ns.pixel_space, seed=ns.seed,
                                words=vocabulary())
        print(f"wrote a tiny {'image' if ns.i2v else 'text'}-to-video Wan2.1 pipeline to {ns.out}")
    elif ns.what == "moving-shapes":
        if ns.num < 1 or ns.frames < 2 or ns.size < 4:
            raise OpenSpeedError("moving-shapes: need --num >= 1, --frames >= 2 and --size >= 4")
        from openspeed.data.moving_shapes import make_moving_shapes

        path = make_moving_shapes(ns.out, ns.num, frames=ns.frames, height=ns.size, width=ns.size,
                                  seed=ns.seed, jitter=ns.jitter)
        print(f"wrote {ns.num} clips and {path}")
    elif ns.what == "extract-features":
        from openspeed.config import load_config
        from openspeed.data.features import extract_features

        cfg = load_config(ns.config, ns.overrides)
        prepare_data(cfg)
        check_paths(cfg)
        done = extract_features(cfg, ns.out, shard_samples=max(1, ns.shard_samples))
        print(f"wrote features of {done['samples']} samples ({done['skipped']} skipped) to {done['out']}; "
              f"train with data.train_path={os.path.join(done['out'], 'index.jsonl')}")
    if ns.what == "shapes":
        if ns.num < 2:
            raise OpenSpeedError(f"--num: need at least 2 samples, got {ns.num}")
        from openspeed.data.shapes import make_shapes_dataset

        make_shapes_dataset(ns.out, num=ns.num, seed=ns.seed, image_size=ns.image_size)
        print(f"wrote {ns.num} samples, a tiny model directory and eval.tsv (held-out multiple choice) to {ns.out}")
    return 0


# ----------------------------------------------------------------------------- eval


def cmd_eval(args: list[str]) -> int:
    parser = _ArgParser(prog="openspeed eval")
    parser.add_argument("--checkpoint", required=True, help="run directory or one of its checkpoints")
    parser.add_argument("--data", required=True, help="MMBench-style TSV (docs/evaluation.md)")
    parser.add_argument("--out", help="directory for results.json and predictions.jsonl "
                                      "(default: RUN_DIR/eval/<data file name>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate the first N usable rows only")
    parser.add_argument("--prompt", choices=["choices", "question"], default="choices",
                        help="'question': ask without the options, match the reply to them by text")
    ns = parser.parse_args(args)
    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise OpenSpeedError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if not os.path.isfile(ns.data):
        raise OpenSpeedError(f"--data: file not found: {ns.data}")
    if not os.path.isdir(ns.checkpoint):
        raise OpenSpeedError(f"--checkpoint: run directory not found: {ns.checkpoint}")

    from openspeed.eval.tsv import run_tsv_eval

    result = run_tsv_eval(ns.checkpoint, ns.data, ns.out, batch_size=ns.batch_size,
                          max_new_tokens=ns.max_new_tokens, limit=ns.limit, prompt_style=ns.prompt,
                          report=lambda line: print(line, file=sys.stderr))
    for category, s in result["per_category"].items():
        print(f"  {category:<10} accuracy {s['accuracy']:.3f} ({s['correct']}/{s['n']}, "
              f"unparseable {s['unparseable']})")
    print(f"accuracy: {result['accuracy']:.3f} ({result['correct']}/{result['n']}, unparseable "
          f"{result['unparseable']}, random-choice {result['random_choice_accuracy']:.3f}, "
          f"skipped {len(result['skipped_rows'])}; step {result['step']}) -> {result['out_dir']}")
    return 0


# ----------------------------------------------------------------------------- generate


def _is_wan_run_dir(path: str) -> bool:
    """Whether a run (or checkpoint) directory belongs to a Wan run."""
    from openspeed.config import load_config
    from openspeed.training.dit_trainer import is_dit_run

    for run_dir in (path, os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        config = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(config):
            try:
                return is_dit_run(load_config(config))
            except OpenSpeedError:
                return False
    return False


def cmd_generate(args: list[str]) -> int:
    parser = _ArgParser(prog="openspeed generate")
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
    parser.add_argument("--shift", type=float, default=None, help="default: the run's train.flow_shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score", action="store_true", help="score colour and motion (moving-shapes checker)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights even if EMA exists")
    parser.add_argument("--nproc", type=int, help="processes to split the video tokens over (Ulysses)")
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
        from openspeed.data.moving_shapes import eval_prompts

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
    if under_launcher():  # a worker of --nproc, or of the user's torchrun: run_generate reads WORLD_SIZE
        if ns.nproc is not None and ns.nproc != int(os.environ["WORLD_SIZE"]):
            raise OpenSpeedError(f"--nproc {ns.nproc} differs from the launcher's {os.environ['WORLD_SIZE']} processes")
    elif ns.nproc and ns.nproc > 1:
        return launch(ns.nproc, _drop_option(args, "--nproc"), command="generate")
    from openspeed.inference.wan_generate import run_generate

    summary = run_generate(
        ns.checkpoint, prompts, ns.out, image_paths=ns.image, score=ns.score or bool(ns.eval_prompts),
        ema=False if ns.no_ema else None, frames=ns.frames, height=ns.height, width=ns.width, steps=ns.steps,
        guidance=ns.guidance, shift=ns.shift, seed=ns.seed, negative_prompt=ns.negative_prompt,
        batch_size=ns.batch_size,
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


def _drop_option(args: list[str], name: str) -> list[str]:
    """``args`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for item in args:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(f"{name}="):
            out.append(item)
    return out


class _ArgParser(argparse.ArgumentParser):
    """argparse that reports a one-line OpenSpeedError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise OpenSpeedError(f"{self.prog}: {message}")
