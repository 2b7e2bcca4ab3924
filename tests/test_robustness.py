"""Crash safety and bad input: SIGKILL during a save, SIGTERM, broken samples, frozen parts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _train_utils import ROOT, make_tiny_run_config, read_metrics, run_train, train_curve, train_losses


def _popen_train(config, *args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "openspeed", "train", config, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_during_save_resumes_from_previous_complete_checkpoint(shapes_dir, tmp_path):
    os.makedirs(tmp_path / "ref", exist_ok=True)
    ref_cfg = make_tiny_run_config(str(tmp_path / "ref"), shapes_dir, train={"max_steps": 6})
    reference = run_train(ref_cfg)
    assert reference.returncode == 0, reference.stderr[-2000:]

    os.makedirs(tmp_path / "crash", exist_ok=True)
    config = make_tiny_run_config(
        str(tmp_path / "crash"), shapes_dir, train={"max_steps": 6},
        checkpoint={"interval": 2, "keep_last": 1, "save_final": False},
    )
    run_dir = tmp_path / "crash" / "run"
    ckpts = run_dir / "checkpoints"
    # Every save pauses after writing its shards; kill the trainer inside the save of step 4.
    proc = _popen_train(config, env_extra={"OPENSPEED_TEST_SAVE_PAUSE_S": "2"})
    try:
        assert _wait_for(lambda: (ckpts / "step_4.incomplete" / "rng" / "rank0.json").exists())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (ckpts / "step_2").is_dir() and (ckpts / "step_4.incomplete").is_dir()
    assert not (ckpts / "step_4").exists()

    resumed = run_train(config, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 2" in resumed.stderr
    curve, ref = train_curve(str(run_dir)), train_curve(str(tmp_path / "ref" / "run"))
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):  # loss and gradient norm
        assert curve[step] == pytest.approx(ref[step], rel=1e-6, abs=0)
    # keep_last=1: the newest complete checkpoint survives, older ones and the torn one are gone.
    assert sorted(os.listdir(ckpts)) == ["step_6"]


def test_sigterm_saves_and_exits_cleanly(shapes_dir, tmp_path):
    config = make_tiny_run_config(str(tmp_path), shapes_dir, train={"max_steps": 10_000})
    run_dir = tmp_path / "run"
    proc = _popen_train(config)
    try:
        assert _wait_for(lambda: (run_dir / "metrics.jsonl").exists()
                         and len(train_losses(str(run_dir))) >= 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    step = max(train_losses(str(run_dir)))
    assert f"SIGTERM: saved checkpoint at step {step}" in stderr
    assert (run_dir / "checkpoints" / f"step_{step}" / "train_state.json").is_file()


def test_broken_samples_are_skipped_and_counted(shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    os.remove(data / first["images"][0])  # a missing image
    png = data / second["images"][0]
    png.write_bytes(png.read_bytes()[:60])  # a truncated PNG
    lines.insert(5, '{"messages": [{"role": "user", "content": "<image>broken')  # a malformed line
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    num_train = len(lines)

    steps = -(-num_train // 8)  # one full epoch, so every bad sample is met
    config = make_tiny_run_config(str(tmp_path), str(data), train={"max_steps": steps})
    result = run_train(config, "--nproc", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped samples: 3 (corrupt_media=1, malformed_record=1, missing_file=1)" in result.stderr
    final = [r for r in read_metrics(str(tmp_path / "run")) if "skipped_samples" in r][-1]
    assert final["skipped_samples"] == 3
    assert final["skipped_by_reason"] == {"corrupt_media": 1, "malformed_record": 1, "missing_file": 1}
    assert sorted(train_losses(str(tmp_path / "run"))) == list(range(1, steps + 1))


def _snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def test_a_rerun_never_loses_a_run(shapes_dir, tmp_path):
    config = make_tiny_run_config(str(tmp_path), shapes_dir, data={"val_path": None},
                                  train={"max_steps": 4, "exit_interval": 2}, checkpoint={"interval": 2})
    run_dir = tmp_path / "run"
    first = run_train(config)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(run_dir)
    assert "checkpoints/step_2/train_state.json" in before and "metrics.jsonl" in before

    # A fresh start into the used directory: one line, exit 2, not a byte changed.
    again = run_train(config, "train.exit_interval=null")
    assert again.returncode == 2, again.stderr[-2000:]
    errors = [line for line in again.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0] and "train.overwrite=true" in errors[0], again.stderr
    assert "Traceback" not in again.stderr
    assert _snapshot(run_dir) == before

    # A worker group restarted by the elastic agent resumes the interrupted run instead.
    restarted = run_train(config, "train.exit_interval=null", env_extra={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "resumed from" in restarted.stderr and "step 2" in restarted.stderr
    assert sorted(train_losses(str(run_dir))) == [1, 2, 3, 4]
    run_id = json.loads((run_dir / "checkpoints" / "step_2" / "train_state.json").read_text())["run_id"]
    assert json.loads((run_dir / "checkpoints" / "step_4" / "train_state.json").read_text())["run_id"] == run_id

    # train.overwrite=true starts over; the earlier run is kept beside it, whole.
    finished = _snapshot(run_dir)
    fresh = run_train(config, "train.exit_interval=null", "train.overwrite=true")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "moved to" in fresh.stderr and "resumed from" not in fresh.stderr
    assert _snapshot(tmp_path / "run.previous") == finished
    assert sorted(train_losses(str(run_dir))) == [1, 2, 3, 4]
    new_id = json.loads((run_dir / "checkpoints" / "step_4" / "train_state.json").read_text())["run_id"]
    assert new_id != run_id
