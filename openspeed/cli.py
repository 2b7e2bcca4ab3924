"""``openspeed`` command line: train | chat | eval | convert | data, plus the verbs model families add.

Everything a user can get wrong is checked before torch is imported and reported as one line on
stderr with exit status 2.
"""

from __future__ import annotations

import errno
import os
import sys

from openspeed.errors import OpenSpeedError

CORE_USAGE = """usage: openspeed <command> ...

commands:
  train CONFIG [--nproc N] [key=value ...]   train a model (see docs/config.md)
  chat --checkpoint RUN_DIR [--image IMG ...] "question"
                                              answer a question about images with a trained run
  chat --checkpoint RUN_DIR --questions FILE.jsonl [--out FILE.jsonl]
                                              answer a batch of questions, write JSONL
  convert RUN_DIR --to hf --out DIR [--max-shard-size 2GB] [--ema]
                                              export a run's latest checkpoint in its reference format
                                              (a LoRA run merged; also --merge-lora)
  convert RUN_DIR --to peft --out DIR         a LoRA run's adapter for peft over its model.path
  eval --checkpoint RUN_DIR --data FILE.tsv [--out DIR] [--batch-size N] [--max-new-tokens N] [--limit N]
       [--prompt choices|question]          accuracy on an MMBench-style TSV (see docs/evaluation.md)
  chat, eval and convert take --device auto|cpu|cuda[:N]|npu[:N]: where the model runs (default auto:
  this machine's accelerator, the CPU when it has none; convert's default: cpu)
"""


def usage() -> str:
    """The help text: the core commands, then what the model families register."""
    from openspeed.models.families import commands, data_commands

    text = CORE_USAGE
    for command in commands().values():
        text += command.usage
    for command in data_commands().values():
        text += command.usage
    return text


from openspeed.commands import (  # noqa: E402 - after the help text
    ERROR_FILE_ENV,
    EXIT_USER_ERROR,
    ArgParser,
    add_device_option,
    check_paths,
    check_writable,
    launch,
    prepare_data,
    under_launcher,
)

CORE_COMMANDS = ("train", "chat", "eval", "convert", "data")

# OS errors that a user's paths or machine cause (a folder they cannot write, a full or read-only
# disk, a path through a regular file), with the verb of their one-line report; any other OSError is
# a bug and keeps its traceback.
_USER_OS_ERRORS = {
    errno.EACCES: "access", errno.EPERM: "access", errno.ENOTDIR: "access",
    errno.ENOSPC: "write", errno.EDQUOT: "write", errno.EROFS: "write", errno.EISDIR: "write",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(usage(), end="")
            return 0 if argv else EXIT_USER_ERROR
        command, rest = argv[0], argv[1:]
        core = {"train": cmd_train, "data": cmd_data, "chat": cmd_chat, "convert": cmd_convert, "eval": cmd_eval}
        if command in core:
            return core[command](rest)
        from openspeed.models.families import commands

        registered = commands()
        if command in registered:
            return registered[command].run(rest)
        known = ", ".join([*CORE_COMMANDS, *registered])
        raise OpenSpeedError(f"unknown command '{command}' (commands: {known})")
    except OpenSpeedError as exc:
        report_user_error(str(exc))
        return EXIT_USER_ERROR
    except OSError as exc:
        if exc.errno not in _USER_OS_ERRORS:
            raise
        where = f" {exc.filename}" if exc.filename is not None else ""
        report_user_error(f"cannot {_USER_OS_ERRORS[exc.errno]}{where}: {exc.strerror}")
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


def _device(ns):
    """The ``torch.device`` of ``--device`` (see :func:`openspeed.commands.add_device_option`); a device
    this machine lacks is one line. Checked after the options and paths (it imports torch)."""
    from openspeed.accelerator import resolve_device

    return resolve_device(ns.device)


def _check_positive(ns, *names: str) -> None:
    """One-line errors for integer options (``ns.<name>``, unset ones skipped) below 1."""
    for name in names:
        value = getattr(ns, name)
        if value is not None and value < 1:
            raise OpenSpeedError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")


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


def cmd_train(args: list[str]) -> int:
    from openspeed.config import load_config, resolve_layout
    from openspeed.training.run_dir import check_run_dir

    config_path, nproc, overrides = parse_train_args(args)
    cfg = load_config(config_path, overrides)
    if under_launcher():
        world_size = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != int(os.environ.get("LOCAL_WORLD_SIZE", world_size)):
            raise OpenSpeedError(f"--nproc {nproc} differs from the launcher's {world_size} processes")
    else:
        world_size = nproc or 1
    resolve_layout(cfg, world_size)
    check_run_dir(cfg)  # before anything is written: a refused fresh start leaves the run as it was
    check_writable(cfg.train.run_dir, "train.run_dir")
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("OPENSPEED_DATA_READY"):
        prepare_data(cfg)
    elif cfg.family is None:
        from openspeed.config import bind_known_family

        bind_known_family(cfg)
    check_paths(cfg)

    if world_size > 1 and not under_launcher():
        return launch(world_size, [config_path, *overrides])

    from openspeed.training.trainer import run_training

    run_training(cfg)
    return 0


# ----------------------------------------------------------------------------- chat


def cmd_chat(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed chat")
    parser.add_argument("--checkpoint", required=True, help="run directory or one of its checkpoints")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--questions", help="JSONL of {image(s), question} or conversation records")
    parser.add_argument("--out", help="where --questions answers go (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, help="sample from the top-p nucleus (default: greedy)")
    parser.add_argument("--seed", type=int, help="seed of the sampling, for reproducible answers")
    add_device_option(parser)
    parser.add_argument("question", nargs="?")
    ns = parser.parse_args(args)
    if (ns.question is None) == (ns.questions is None):
        raise OpenSpeedError("openspeed chat: give either a question or --questions FILE.jsonl")
    if ns.temperature is not None and not ns.temperature > 0:
        raise OpenSpeedError(f"--temperature must be > 0, got {ns.temperature}")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        raise OpenSpeedError(f"--top-p must be in (0, 1], got {ns.top_p}")
    _check_positive(ns, "batch_size", "max_new_tokens")
    sampling = {"temperature": ns.temperature, "top_p": ns.top_p, "seed": ns.seed}
    for path in [*ns.image, *([ns.questions] if ns.questions else [])]:
        if not os.path.isfile(path):
            raise OpenSpeedError(f"file not found: {path}")
    if not os.path.isdir(ns.checkpoint):
        raise OpenSpeedError(f"--checkpoint: run directory not found: {ns.checkpoint}")
    if ns.out:
        check_writable(ns.out, directory=False)
    device = _device(ns)

    from openspeed.inference.chat import answer_file, answer_one

    if ns.question is not None:
        print(answer_one(ns.checkpoint, ns.question, ns.image, max_new_tokens=ns.max_new_tokens, device=device,
                         **sampling))
        return 0
    count, skipped = answer_file(ns.checkpoint, ns.questions, ns.out, max_new_tokens=ns.max_new_tokens,
                                 batch_size=ns.batch_size, device=device, **sampling)
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
    parser = ArgParser(prog="openspeed convert")
    parser.add_argument("run_dir", help="run directory or one of its checkpoints")
    parser.add_argument("--to", choices=["hf", "peft"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--merge-lora", action="store_true", help="fold a LoRA run's adapters into the weights")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema_decay runs)")
    # The files are written from the CPU whatever the device, so loading elsewhere gains nothing by default.
    add_device_option(parser, default="cpu")
    ns = parser.parse_args(args)
    shard = _parse_size(ns.max_shard_size)
    if not os.path.isdir(ns.run_dir):
        raise OpenSpeedError(f"run directory not found: {ns.run_dir}")
    check_writable(ns.out)
    device = _device(ns)
    from openspeed.training.export import export_run

    print(export_run(ns.run_dir, ns.out, to=ns.to, merge_lora=ns.merge_lora, ema=True if ns.ema else None,
                     max_shard_size_bytes=shard, device=device))
    return 0


# ----------------------------------------------------------------------------- data


def cmd_data(args: list[str]) -> int:
    """``openspeed data NAME ...``: the sub-commands the model families register."""
    from openspeed.models.families import data_commands

    registered = data_commands()
    if not args or args[0].startswith("-"):
        raise OpenSpeedError(f"openspeed data: give a sub-command ({', '.join(registered)})")
    if args[0] not in registered:
        raise OpenSpeedError(f"openspeed data: unknown sub-command '{args[0]}' (known: {', '.join(registered)})")
    return registered[args[0]].run(args[1:])


# ----------------------------------------------------------------------------- eval


def cmd_eval(args: list[str]) -> int:
    parser = ArgParser(prog="openspeed eval")
    parser.add_argument("--checkpoint", required=True, help="run directory or one of its checkpoints")
    parser.add_argument("--data", required=True, help="MMBench-style TSV (docs/evaluation.md)")
    parser.add_argument("--out", help="directory for results.json and predictions.jsonl "
                                      "(default: RUN_DIR/eval/<data file name>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate the first N usable rows only")
    parser.add_argument("--prompt", choices=["choices", "question"], default="choices",
                        help="'question': ask without the options, match the reply to them by text")
    add_device_option(parser)
    ns = parser.parse_args(args)
    _check_positive(ns, "batch_size", "max_new_tokens", "limit")
    if not os.path.isfile(ns.data):
        raise OpenSpeedError(f"--data: file not found: {ns.data}")
    if not os.path.isdir(ns.checkpoint):
        raise OpenSpeedError(f"--checkpoint: run directory not found: {ns.checkpoint}")
    if ns.out:
        check_writable(ns.out)
    device = _device(ns)

    from openspeed.eval.tsv import run_tsv_eval

    result = run_tsv_eval(ns.checkpoint, ns.data, ns.out, batch_size=ns.batch_size,
                          max_new_tokens=ns.max_new_tokens, limit=ns.limit, prompt_style=ns.prompt,
                          report=lambda line: print(line, file=sys.stderr), device=device)
    for category, s in result["per_category"].items():
        print(f"  {category:<10} accuracy {s['accuracy']:.3f} ({s['correct']}/{s['n']}, "
              f"unparseable {s['unparseable']})")
    print(f"accuracy: {result['accuracy']:.3f} ({result['correct']}/{result['n']}, unparseable "
          f"{result['unparseable']}, random-choice {result['random_choice_accuracy']:.3f}, "
          f"skipped {len(result['skipped_rows'])}; step {result['step']}) -> {result['out_dir']}")
    return 0
