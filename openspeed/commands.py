"""Pieces every ``openspeed`` command shares, the families' commands included: one-line argument
errors, the multi-process launcher, and the data a run needs made before it starts."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile

from openspeed.errors import ConfigError, OpenSpeedError

EXIT_USER_ERROR = 2
ERROR_FILE_ENV = "OPENSPEED_ERROR_FILE"


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a one-line OpenSpeedError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise OpenSpeedError(f"{self.prog}: {message}")


DEVICE_HELP = ("where to run: auto (this machine's accelerator, the CPU when it has none), cpu, cuda[:N] "
               "or npu[:N]")


def add_device_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``, the option of every single-process command that runs a model (chat, eval,
    generate, convert); :func:`openspeed.accelerator.resolve_device` reads it (a device this machine
    lacks is a one-line error)."""
    parser.add_argument("--device", default=default, help=f"{DEVICE_HELP} (default: {default})")


def under_launcher() -> bool:
    """Whether this process is a worker of ``torchrun`` (or of :func:`launch`)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


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


def drop_option(args: list[str], name: str) -> list[str]:
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


def prepare_data(cfg) -> None:
    """Make the synthetic data ``data.generate`` asks for (once, before any worker starts), then bind
    the config to the run's model family if it was not known before the data existed."""
    if cfg.data.generate:
        from openspeed.models.families import generator

        _, gen = generator(cfg.data.generate)
        gen.prepare(cfg)
    if cfg.family is None:
        from openspeed.config import bind_known_family

        bind_known_family(cfg)


def check_writable(path: str, option: str = "--out", directory: bool = True) -> None:
    """A one-line error now, rather than after minutes of work, when ``path`` cannot be written.

    ``path`` is a directory (``directory``) or a file to write; it and its missing parents are made
    later by the command. The nearest folder above it that exists must take a new file: a probe file
    is made there and removed, so a read-only folder, a read-only file system and a path through a
    regular file are caught (a full disk is only caught when the command writes).
    """
    target = os.path.abspath(path)
    if os.path.exists(target) and os.path.isdir(target) != directory:
        reason = errno.ENOTDIR if directory else errno.EISDIR
        raise OpenSpeedError(f"{option}: cannot write {path}: {os.strerror(reason)}")
    folder = target if directory else os.path.dirname(target)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise OpenSpeedError(f"{option}: cannot write {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".openspeed-write-check-", dir=folder)
    except OSError as exc:
        raise OpenSpeedError(f"{option}: cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def check_paths(cfg) -> None:
    """One-line errors for the files a training run reads but does not have."""
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
    if cfg.family is None:
        raise ConfigError(f"model.path: cannot tell the model family of {cfg.model.path} (no config.json)")
    resume = cfg.train.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise ConfigError(f"train.resume: checkpoint directory not found: {resume}")


__all__ = ["ArgParser", "EXIT_USER_ERROR", "ERROR_FILE_ENV", "add_device_option", "check_paths", "check_writable",
           "drop_option", "launch", "prepare_data", "under_launcher"]
