"""What a user can get wrong around the commands, each one line ``error: ...`` with exit status 2 (or a
one-line warning where the run goes on): output paths that cannot be written, a full disk, a bad
``OPENSPEED_DEVICE``, a broken torch_npu, a missing TensorBoard, a broken Wan ``config.json``, chat's
integer options.

Most cases call ``openspeed.cli.main`` in-process (they fail before any model is built); the few
that go through ``openspeed train`` run it as a subprocess, as a user would.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from _runs import plain_process  # noqa: F401 - autouse: a clean environment per test

from openspeed import cli
from openspeed.commands import ERROR_FILE_ENV, EXIT_USER_ERROR
from openspeed.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OS_REASONS = ("Permission denied", "Operation not permitted", "Read-only file system", "not a directory",
              "Not a directory")


def _main(capsys, *argv: str) -> tuple[int, str]:
    """``openspeed ARGV`` in this process: (exit status, its one stderr line; asserted to be one)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    full.pop(ERROR_FILE_ENV, None)
    return subprocess.run([sys.executable, "-m", "openspeed", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _wan_model(folder: Path, **changes) -> Path:
    """A diffusers ``WanTransformer3DModel`` directory: its ``config.json`` alone (no weights)."""
    from openspeed.models.wan.config import WanConfig

    config = WanConfig(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=32,
                       freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64).to_hf_dict()
    config.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _run_config(tmp: Path, model: Path, name: str = "run") -> tuple[Path, Path]:
    """(training config, run directory holding that config as an earlier run's config.yaml)."""
    (tmp / "train.jsonl").write_text('{"video": "clip.mp4", "caption": "a red square"}\n')
    cfg = {"model": {"path": str(model)}, "data": {"train_path": str(tmp / "train.jsonl")},
           "train": {"run_dir": str(tmp / name), "max_steps": 1}, "logging": {"progress": False}}
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp / name).mkdir(exist_ok=True)
    (tmp / name / "config.yaml").write_text(yaml.safe_dump(cfg))
    return config, tmp / name


# ----------------------------------------------------------------------------- output paths


@pytest.fixture(params=["read-only folder", "under a regular file"])
def unwritable(request, tmp_path) -> tuple[str, str]:
    """(an output path that cannot be made, the OS's reason) on this machine."""
    if request.param == "under a regular file":
        (tmp_path / "file").write_text("not a folder\n")
        return str(tmp_path / "file" / "out"), "not a directory"
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        request.addfinalizer(lambda: folder.chmod(0o700))
    else:  # root writes through any mode bits; sysfs takes no new files, from anyone
        folder = Path("/sys/kernel")
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError as exc:
        return str(folder / "out"), exc.strerror
    os.close(fd)
    os.unlink(probe)
    pytest.skip(f"{folder} takes new files on this machine")


def _out_commands(tmp: Path, out: str) -> dict[str, list[str]]:
    (tmp / "data.tsv").write_text("index\tquestion\tanswer\n")
    (tmp / "questions.jsonl").write_text('{"question": "what shape?"}\n')
    (tmp / "empty.yaml").write_text("{}\n")
    return {
        "convert": ["convert", tmp, "--to", "hf", "--out", out],
        "generate": ["generate", "--checkpoint", tmp, "--prompt", "a red square", "--out", f"{out}.mp4"],
        "generate several": ["generate", "--checkpoint", tmp, "--prompt", "a", "--prompt", "b", "--out", out],
        "eval": ["eval", "--checkpoint", tmp, "--data", tmp / "data.tsv", "--out", out],
        "chat": ["chat", "--checkpoint", tmp, "--questions", tmp / "questions.jsonl", "--out", f"{out}.jsonl"],
        "extract-features": ["data", "extract-features", tmp / "empty.yaml", "--out", out],
        "tiny-wan-pipeline": ["data", "tiny-wan-pipeline", "--out", out],
        "moving-shapes": ["data", "moving-shapes", "--out", out, "--num", "1"],
        "train": ["train", tmp / "empty.yaml", f"train.run_dir={out}"],
    }


@pytest.mark.parametrize("command", ["convert", "generate", "generate several", "eval", "chat",
                                     "extract-features", "tiny-wan-pipeline", "moving-shapes", "train"])
def test_unwritable_output_is_one_line_before_any_work(capsys, tmp_path, unwritable, command):
    out, reason = unwritable
    argv = _out_commands(tmp_path, out)[command]
    code, line = _main(capsys, *argv)
    assert code == EXIT_USER_ERROR
    assert line.startswith("error: ") and "cannot write" in line and out in line and reason in line, line


def test_unwritable_output_of_a_family_data_command_is_one_line(capsys, tmp_path, unwritable):
    """``openspeed data shapes`` has no check of its own: the CLI reports the OSError it raises."""
    out, _ = unwritable
    code, line = _main(capsys, "data", "shapes", "--out", out, "--num", "2")
    assert code == EXIT_USER_ERROR
    assert line.startswith(f"error: cannot access {out}") and line.endswith(OS_REASONS), line


@pytest.mark.parametrize("command", [["data", "shapes", "--num", "2"], ["data", "moving-shapes", "--num", "1"]])
def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch, command):
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(os, "mkdir", full)
    out = tmp_path / "out"
    code, line = _main(capsys, *command, "--out", out)
    assert code == EXIT_USER_ERROR
    assert line.startswith(f"error: cannot write {out}") and line.endswith(": No space left on device"), line


def test_other_os_errors_keep_their_traceback(monkeypatch):
    """Only what a user's paths or machine cause is a user error; anything else is a bug to see."""
    def broken(args):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(cli, "cmd_data", broken)
    with pytest.raises(ConnectionResetError):
        cli.main(["data", "shapes"])


# ----------------------------------------------------------------------------- device


@pytest.mark.parametrize("nproc", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_bad_device_variable_is_one_line_through_train(tmp_path, nproc):
    """Also from launched workers: the launcher prints their line alone."""
    config, _ = _run_config(tmp_path, _wan_model(tmp_path / "model"))
    result = _cli("train", str(config), "--nproc", nproc, "train.global_batch_size=2",
                  env={"OPENSPEED_DEVICE": "gpu"})
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["error: OPENSPEED_DEVICE: expected one of cpu, cuda, npu, got 'gpu'"]


def test_missing_devices_are_config_errors(monkeypatch):
    import torch

    from openspeed.accelerator import get_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OPENSPEED_DEVICE", "cuda")
    with pytest.raises(ConfigError, match=r"^OPENSPEED_DEVICE=cuda, but torch .* finds no CUDA device \(choose from cpu, cuda, npu\)$"):
        get_accelerator()
    monkeypatch.setenv("OPENSPEED_DEVICE", " CPU ")
    get_accelerator.cache_clear()
    assert (get_accelerator().device_type, get_accelerator().backend) == ("cpu", "gloo")


@pytest.fixture
def broken_torch_npu(tmp_path, monkeypatch):
    """A torch_npu that is installed but fails to import (as with missing Ascend libraries)."""
    import torch

    package = tmp_path / "site" / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("libascend_hal.so: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_broken_torch_npu_warns_once_and_uses_the_cpu(capsys, broken_torch_npu):
    from openspeed.accelerator import get_accelerator

    assert get_accelerator().device_type == "cpu" and get_accelerator().device_type == "cpu"
    assert capsys.readouterr().err.splitlines() == [
        "warning: torch_npu fails to import (ImportError: libascend_hal.so: cannot open shared object file); "
        "using the CPU (set OPENSPEED_DEVICE=cpu to choose it)"
    ]


def test_broken_torch_npu_asked_for_is_a_config_error(capsys, broken_torch_npu, monkeypatch):
    from openspeed.accelerator import get_accelerator

    monkeypatch.setenv("OPENSPEED_DEVICE", "npu")
    with pytest.raises(ConfigError, match=r"^OPENSPEED_DEVICE=npu, but torch_npu fails to import \(ImportError: "
                                          r"libascend_hal\.so: .*\) \(choose from cpu, cuda, npu\)$"):
        get_accelerator()
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize(("tensorboard", "warned"), [(True, True), (None, False), (False, False)])
def test_missing_tensorboard(capsys, tmp_path, monkeypatch, tensorboard, warned):
    """Asked for (true) and missing: one warning line, and the metrics still reach metrics.jsonl;
    left at null (write it when installed) or false: no word about it."""
    from openspeed.training.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=tensorboard)
    writer.log({"step": 1, "loss": 2.5})
    writer.close()
    err = capsys.readouterr().err.splitlines()
    if warned:
        assert len(err) == 1 and err[0].startswith("warning: logging.tensorboard: cannot use TensorBoard ("), err
        assert err[0].endswith("(pip install tensorboard, or set logging.tensorboard=false)")
    else:
        assert err == []
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 2.5}]
    assert not (tmp_path / "tensorboard").exists()


def test_no_tensorboard_warning_where_no_metrics_are_written(capsys, tmp_path, monkeypatch):
    from openspeed.training.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    MetricsWriter(str(tmp_path), enabled=False, tensorboard=True).close()  # what ranks other than 0 make
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- broken Wan config.json

BROKEN_WAN_CONFIGS = {
    "unparseable": ("{not json", "cannot read {file}: Expecting property name"),
    "no _class_name": ({"_class_name": None}, "{file} has no model_type"),
    "text for a number": ({"num_attention_heads": "two"},
                          "{file}: wan num_attention_heads must be a positive integer, got 'two'"),
    "two-axis patch": ({"patch_size": [1, 2]},
                       "{file}: wan patch_size must be 3 integers (frames, height, width), got [1, 2]"),
}


def _broken_wan_model(folder: Path, case: str) -> tuple[Path, str]:
    content, expected = BROKEN_WAN_CONFIGS[case]
    model = _wan_model(folder)
    if isinstance(content, str):
        (model / "config.json").write_text(content)
    else:
        config = json.loads((model / "config.json").read_text())
        config.update(content)
        (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return model, expected.format(file=model / "config.json")


@pytest.mark.parametrize("case", list(BROKEN_WAN_CONFIGS))
@pytest.mark.parametrize("command", ["convert", "generate"])
def test_broken_wan_config_is_one_line(capsys, tmp_path, case, command):
    model, expected = _broken_wan_model(tmp_path / "model", case)
    _, run = _run_config(tmp_path, model)
    argv = {"convert": ["convert", run, "--to", "hf", "--out", tmp_path / "export"],
            "generate": ["generate", "--checkpoint", run, "--prompt", "a red square", "--out", tmp_path / "a.mp4"]}
    code, line = _main(capsys, *argv[command])
    assert code == EXIT_USER_ERROR
    assert line.startswith("error: ") and expected in line, line


def test_broken_wan_config_is_one_line_through_train(tmp_path):
    model, expected = _broken_wan_model(tmp_path / "model", "text for a number")
    config, _ = _run_config(tmp_path, model)
    result = _cli("train", str(config))
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {expected}"]


# ----------------------------------------------------------------------------- chat's options


@pytest.mark.parametrize(("option", "value"), [("--batch-size", "0"), ("--max-new-tokens", "-1")])
@pytest.mark.parametrize("command", ["chat", "eval"])
def test_chat_checks_its_integer_options_as_eval_does(capsys, tmp_path, option, value, command):
    (tmp_path / "data.tsv").write_text("index\tquestion\tanswer\n")
    argv = {"chat": ["chat", "--checkpoint", tmp_path, option, value, "what shape is it?"],
            "eval": ["eval", "--checkpoint", tmp_path, "--data", tmp_path / "data.tsv", option, value]}[command]
    code, line = _main(capsys, *argv)
    assert (code, line) == (EXIT_USER_ERROR, f"error: {option}: must be at least 1, got {value}")
