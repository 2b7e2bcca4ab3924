"""MFU reporting: batch FLOPs from the model's analytic formula, the cached matmul peak, and the
trainer's per-step ``tflops`` / ``mfu`` fields."""

from __future__ import annotations

import json

import pytest
import torch
from _train_utils import make_tiny_run_config, read_metrics, run_train

from openspeed.accelerator import get_accelerator
from openspeed.config import load_config
from openspeed.models.loading import read_hf_config
from openspeed.models.qwen2_5_vl.flops import flops_breakdown
from openspeed.models.registry import get_model_spec
from openspeed.tasks.vlm_sft import VLMTask


def _task(shapes_dir: str, tmp_path, **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(make_tiny_run_config(str(tmp_path), shapes_dir, data=data), [])
    hf = read_hf_config(cfg.model.path)
    spec = get_model_spec(hf["model_type"])
    return VLMTask(cfg), spec, spec.config_from_hf(hf)


def test_batch_flops_follow_the_formula_and_ignore_the_layout(shapes_dir, tmp_path):
    task, spec, config = _task(shapes_dir, tmp_path)
    indices = [0, 1, 2]
    padded = task.load_batch(task.train_set, indices)
    # Each sample on its own: text tokens, its image grid, its own causal attention.
    expected = 0.0
    for i in indices:
        one = task.load_batch(task.train_set, [i])
        n = int(one["attention_mask"].sum())
        placeholders = int((one["input_ids"] == config.image_token_id).sum())
        expected += sum(flops_breakdown(config, n - placeholders, one["image_grid_thw"], None, [n]).values())
    assert task.batch_flops(spec, config, padded) == pytest.approx(expected, rel=1e-12)
    # Padding adds nothing; packing the same samples into one row counts the same work.
    packed_task, _, _ = _task(shapes_dir, tmp_path / "packed", packing=True)
    packed = packed_task.load_batch(packed_task.train_set, indices)
    assert packed["input_ids"].shape[0] == 1
    assert packed_task.batch_flops(spec, config, packed) == pytest.approx(expected, rel=1e-12)
    # Attention is part of it: one long sequence would cost more than three short ones.
    n_all = int(padded["attention_mask"].sum())
    text = n_all - int((padded["input_ids"] == config.image_token_id).sum())
    one_sequence = sum(flops_breakdown(config, text, padded["image_grid_thw"], None, [n_all]).values())
    assert one_sequence > expected


def test_peak_flops_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSPEED_CACHE", str(tmp_path))
    acc = get_accelerator()
    peak = acc.peak_flops(torch.float32)
    assert peak > 1e8  # any real device does more than 0.1 GFLOP/s
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(cache.values()) == [peak]
    # A second call reads the cache (a planted value proves it is not re-measured).
    key = next(iter(cache))
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: 123.0}))
    assert acc.peak_flops(torch.float32) == 123.0
    # A corrupt cache is measured again and rewritten, not an error.
    (tmp_path / "peak_flops.json").write_text("{not json")
    assert acc.peak_flops(torch.float32) > 1e8


def test_trainer_logs_tflops_and_mfu(shapes_dir, tmp_path):
    config = make_tiny_run_config(str(tmp_path), shapes_dir, train={"max_steps": 2, "peak_tflops": 0.5})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    task, spec, model_config = _task(shapes_dir, tmp_path / "again")
    from openspeed.data.schedule import GlobalBatchSchedule

    cfg = task.cfg
    schedule = GlobalBatchSchedule(len(task.train_set), cfg.train.global_batch_size, cfg.train.seed)
    for record in steps:
        micro = schedule.micro_batches(record["step"], 0, 1, cfg.train.micro_batch_size)
        flops = sum(task.batch_flops(spec, model_config, task.load_batch(task.train_set, idx)) for idx in micro)
        assert record["tflops"] * 1e12 * record["step_time_s"] == pytest.approx(flops, rel=1e-6)
        assert record["mfu"] == pytest.approx(record["tflops"] / 0.5, rel=1e-9)
