"""Wan training end to end through the CLI: resume, data parallel, features, sampling, LoRA, export.

One tiny text-to-video pipeline with the real (tiny, random) ``AutoencoderKLWan`` and UMT5, clips of
the moving-shapes set. References: a one-process run (resumed half-way) for the two-process FSDP run
and the run from extracted features; diffusers' ``WanTransformer3DModel`` with the exported adapter
loaded by peft for the native LoRA model; the LoRA model for its merged export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from _train_utils import ROOT, assert_curves_close, read_metrics, run_train, train_curve, train_losses

from openspeed.models.wan.moving_shapes import make_moving_shapes, vocabulary

FRAMES, HEIGHT, WIDTH = 5, 16, 32


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openspeed", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wan_setup(tmp_path_factory):
    from openspeed.models.wan.pipeline_io import write_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("wan_train")
    pipeline = write_tiny_wan_pipeline(root / "pipe", words=vocabulary(), seed=4, transformer=dict(
        num_attention_heads=2, attention_head_dim=32, ffn_dim=128))
    clips = make_moving_shapes(root / "clips", 8, frames=FRAMES, height=HEIGHT, width=WIDTH, seed=5)
    return root, str(pipeline), str(clips)


def _config(tmp, pipeline: str, train_path: str, name: str, **sections) -> str:
    cfg = {
        "model": {"path": pipeline},
        "data": {"train_path": train_path, "video_buckets": [f"{FRAMES}x{HEIGHT}x{WIDTH}"], "text_len": 8,
                 "caption_dropout": 0.25},
        "train": {"run_dir": str(tmp / name), "max_steps": 3, "seed": 11, "micro_batch_size": 2,
                  "global_batch_size": 4, "flow_shift": 3.0},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"interval": 0, "save_final": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def reference_run(wan_setup):
    """One process with EMA, stopped after step 2 (exit_interval) and resumed to step 3."""
    root, pipeline, clips = wan_setup
    config = _config(root, pipeline, clips, "ref", train={"ema_decay": 0.5, "max_steps": 3})
    first = run_train(config, "train.exit_interval=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "exiting" in first.stderr and sorted(train_losses(str(root / "ref"))) == [1, 2]
    second = run_train(config, "train.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    return str(root / "ref")


def test_resumed_run_logs_every_step_and_saves_ema(reference_run):
    losses = train_losses(reference_run)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
    records = [r for r in read_metrics(reference_run) if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and r["samples"] == 4 for r in records)
    assert os.path.isfile(os.path.join(reference_run, "loss.png"))

    from openspeed.models.wan.generate import load_trained_dit

    ema = load_trained_dit(reference_run, ema=True)
    raw = load_trained_dit(reference_run, ema=False)
    assert ema.ema and not raw.ema and ema.step == raw.step == 3
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(ema.model.parameters(), raw.model.parameters())]
    assert max(diffs) > 1e-5  # the average lags the weights


def test_data_parallel_matches_one_process(wan_setup, reference_run):
    root, pipeline, clips = wan_setup
    config = _config(root, pipeline, clips, "dp2", train={"ema_decay": 0.5})
    result = run_train(config, "--nproc", "2", "parallel.dp_shard=2")
    assert result.returncode == 0, result.stderr[-3000:]
    got, ref = train_curve(str(root / "dp2")), train_curve(reference_run)
    print(f"dp_shard=2 {got} vs one process (resumed) {ref}")
    assert_curves_close(got, ref, steps=(1, 2, 3))


def test_compiled_data_parallel_matches_one_process(wan_setup, reference_run):
    """train.compile (each DiT block, aot_eager) under FSDP2: the eager run's losses and gradient norms."""
    root, pipeline, clips = wan_setup
    config = _config(root, pipeline, clips, "dp2_compiled", train={"ema_decay": 0.5})
    result = run_train(config, "--nproc", "2", "parallel.dp_shard=2", "train.compile=true",
                       "train.compile_backend=aot_eager")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.compile:" in result.stderr
    assert_curves_close(train_curve(str(root / "dp2_compiled")), train_curve(reference_run), rel=1e-5,
                        steps=(1, 2, 3))


def test_training_from_extracted_features_takes_the_same_first_step(wan_setup, reference_run):
    root, pipeline, clips = wan_setup
    raw_config = _config(root, pipeline, clips, "unused")
    out = root / "features"
    extract = _cli("data", "extract-features", raw_config, "--out", str(out), "--shard-samples", "3")
    assert extract.returncode == 0, extract.stderr[-3000:]
    assert len(list(out.glob("features-*.safetensors"))) == 3  # 8 samples, 3 per shard
    config = _config(root, pipeline, str(out / "index.jsonl"), "feat", train={"ema_decay": 0.5, "max_steps": 1})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    got, ref = train_losses(str(root / "feat"))[1], train_losses(reference_run)[1]
    print(f"first-step loss from features {got:.9f} vs raw videos {ref:.9f}: |diff| = {abs(got - ref):.2e}")
    assert abs(got - ref) <= 1e-6


def test_demo_config_smoke_and_generate(tmp_path):
    """The demo recipe makes its data and pipeline on first use, trains, and samples scored clips."""
    data = tmp_path / "demo"
    overrides = [f"data.generate_dir={data}", f"data.train_path={data}/train.jsonl", f"model.path={data}/pipeline",
                 f"train.run_dir={tmp_path}/run", "data.generate_num=8", "train.max_steps=2",
                 "train.micro_batch_size=4", "train.global_batch_size=4", "logging.progress=false"]
    result = run_train(os.path.join(ROOT, "examples", "wan2_1", "moving_shapes_demo.yaml"), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generating the moving-shapes demo set" in result.stderr and (data / "pipeline" / "model_index.json").is_file()
    assert sorted(train_losses(str(tmp_path / "run"))) == [1, 2]

    out = tmp_path / "gen"
    gen = _cli("generate", "--checkpoint", str(tmp_path / "run"), "--eval-prompts", "4", "--out", str(out),
               "--steps", "3")
    assert gen.returncode == 0, gen.stderr[-3000:]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all({"colour_ok", "direction_ok", "video", "frames"} <= set(r) for r in records)
    assert all(os.path.isfile(r["video"]) and os.path.isfile(r["frames"]) for r in records)
    assert "direction" in gen.stdout and "chance" in gen.stdout
    from openspeed.models.wan.generate import run_generate

    one = run_generate(str(tmp_path / "run"), ["a red square moves right"], str(tmp_path / "one.mp4"), steps=2)
    (clip,) = one["clips"]
    assert clip["video"].endswith((".mp4", ".gif")) and os.path.getsize(clip["video"]) > 0
    assert clip["frames"] == str(tmp_path / "one.png") and os.path.isfile(clip["frames"])
    bad = _cli("generate", "--checkpoint", str(tmp_path / "run"), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--prompt" in bad.stderr


def test_lora_adapter_loads_in_peft_and_merges(wan_setup, tmp_path):
    peft = pytest.importorskip("peft")
    from diffusers import WanTransformer3DModel

    from openspeed.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
    from openspeed.models.wan.export import export_wan
    from openspeed.models.wan.generate import load_trained_dit

    root, pipeline, clips = wan_setup
    config = _config(root, pipeline, clips, "lora", model={"path": pipeline, "lora": {
        "rank": 2, "alpha": 4, "targets": ["self_attn.q_proj", "self_attn.v_proj", "attn2.to_k"]}},
        optim={"lr": 2e-2, "warmup_steps": 0, "schedule": "constant"}, memory={"recompute": "full"})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA rank 2 on 6 layers" in result.stderr
    adapter = root / "lora" / "checkpoints" / "step_3" / "adapter"
    assert (adapter / ADAPTER_CONFIG_NAME).is_file() and (adapter / ADAPTER_WEIGHTS_NAME).is_file()

    trained = load_trained_dit(str(root / "lora"))
    native = trained.model
    gen = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(2, 4, 2, 2, 4, generator=gen), "timestep": torch.tensor([800.0, 120.0]),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=gen)}
    base = WanTransformer3DModel.from_pretrained(f"{pipeline}/transformer").eval()
    with torch.no_grad():
        base_out = base(**inputs).sample
        lora_out = native(**inputs).sample
    reference = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        peft_out = reference(**inputs).sample
    err = float((peft_out - lora_out).abs().max())
    moved = float((lora_out - base_out).abs().max())
    print(f"LoRA: native vs peft on diffusers max |diff| = {err:.2e}; LoRA vs base {moved:.2e}")
    assert moved > 1e-3 and err < 1e-4

    # Merge: a plain diffusers transformer that reproduces the LoRA model.
    merged_dir = tmp_path / "merged"
    done = _cli("convert", str(root / "lora"), "--merge-lora", "--out", str(merged_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    merged = WanTransformer3DModel.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        merged_out = merged(**inputs).sample
    merge_err = float((merged_out - lora_out).abs().max())
    print(f"LoRA merged vs LoRA model max |diff| = {merge_err:.2e}")
    assert merge_err < 1e-5

    # Adapter-only export; its weight bytes are a small fraction of the model's.
    only = export_wan(str(root / "lora"), tmp_path / "adapter_only")
    assert only["kind"] == "adapter"
    config_json = json.loads((tmp_path / "adapter_only" / ADAPTER_CONFIG_NAME).read_text())
    assert config_json["r"] == 2 and "blocks.0.attn1.to_q" in config_json["target_modules"]
    adapter_bytes = (tmp_path / "adapter_only" / ADAPTER_WEIGHTS_NAME).stat().st_size
    model_bytes = sum(p.numel() * 4 for p in merged.parameters())
    print(f"adapter {adapter_bytes} bytes = {100 * adapter_bytes / model_bytes:.2f}% of the model's {model_bytes}")
    assert adapter_bytes <= 0.05 * model_bytes
