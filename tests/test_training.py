"""End-to-end training through the CLI: data-parallel equivalence, resume, metrics, config dump."""

import os

import pytest
from _train_utils import (
    assert_curves_close,
    make_tiny_run_config,
    read_metrics,
    run_train,
    train_curve,
    train_losses,
)


def test_single_process_run_writes_metrics_and_config(reference_run):
    run_dir, result = reference_run
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for r in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any("val_loss" in r for r in records)
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_3"))
    assert "trained 5 steps" in result.stderr


@pytest.mark.parametrize(
    "layout",
    ["parallel.dp_shard=2", "parallel.dp_shard=2 parallel.zero_stage=2", "parallel.dp_replicate=2 data.num_workers=1"],
)
def test_data_parallel_matches_one_process(layout, reference_run, warm_shapes_dir, tmp_path):
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir)
    result = run_train(config, "--nproc", "2", *layout.split())
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(str(tmp_path / "run")), train_curve(ref_dir))
    # Validation (loss and greedy accuracy) is gathered over the ranks: same figures as one process.
    val = [r for r in read_metrics(str(tmp_path / "run")) if "val_loss" in r][-1]
    ref_val = [r for r in read_metrics(ref_dir) if "val_loss" in r][-1]
    assert val["val_loss"] == pytest.approx(ref_val["val_loss"], rel=1e-4)
    assert val["val_accuracy_n"] == ref_val["val_accuracy_n"] == 8
    assert val["val_accuracy"] == ref_val["val_accuracy"]


def test_resume_continues_with_identical_losses(reference_run, warm_shapes_dir, tmp_path):
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir, checkpoint={"interval": 3, "save_final": False})
    first = run_train(config, "train.exit_interval=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(train_losses(str(tmp_path / "run"))) == [1, 2, 3]
    second = run_train(config, "train.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step 3" in second.stderr
    curve, reference = train_curve(str(tmp_path / "run")), train_curve(ref_dir)
    assert sorted(curve) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert curve[step] == pytest.approx(reference[step], rel=1e-6, abs=0)


def test_worker_side_user_error_is_one_line(shapes_dir, tmp_path):
    config = make_tiny_run_config(str(tmp_path), shapes_dir)
    # Detected inside the workers (after the model is built), reported once by the launcher.
    result = run_train(config, "--nproc", "2", "model.freeze=vision,merger,llm")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no trainable parameters" in lines[0], result.stderr


def test_tied_embeddings_and_bf16_under_fsdp(shapes_dir, tmp_path):
    """A tied-embedding model trains identically sharded and pipelined (fp32); bf16 autocast stays close."""
    from openspeed.data.shapes import shapes_vocabulary, write_tiny_model_dir

    tied_dir = str(tmp_path / "data")
    import shutil

    shutil.copytree(shapes_dir, tied_dir)
    shutil.rmtree(os.path.join(tied_dir, "model"))
    write_tiny_model_dir(os.path.join(tied_dir, "model"), shapes_vocabulary(2, 3), tie_word_embeddings=True)
    curves = {}
    for name, extra in (("one", []), ("fsdp", ["--nproc", "2", "parallel.dp_shard=2"]),
                        ("pp", ["--nproc", "2", "parallel.pp=2"]), ("bf16", ["train.precision=bf16"])):
        os.makedirs(tmp_path / name)
        config = make_tiny_run_config(str(tmp_path / name), tied_dir, train={"max_steps": 5},
                                      data={"val_path": None})
        result = run_train(config, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        curves[name] = train_curve(str(tmp_path / name / "run"))
    # Losses and gradient norms: a tied weight's gradient counted twice (or not summed over the
    # pipeline stages' copies) leaves the losses under AdamW nearly unchanged but not the norm.
    assert_curves_close(curves["fsdp"], curves["one"])
    # Pipeline stages hold a copy of the tied weight each; their gradients are summed.
    assert_curves_close(curves["pp"], curves["one"])
    for step in (1, 2, 3, 4, 5):
        assert curves["bf16"][step][0] == pytest.approx(curves["one"][step][0], rel=5e-2)
        assert curves["bf16"][step][1] == pytest.approx(curves["one"][step][1], rel=5e-2)
    assert curves["one"][5][0] < curves["one"][1][0]


@pytest.mark.parametrize("level", [0, 1])
def test_every_optimization_level_trains_to_the_same_losses(level, reference_run, warm_shapes_dir, tmp_path):
    # The reference run uses the default level 2 (fused ops + chunked loss); level 0 is the plain
    # reference ops and the plain AdamW.
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir, train={"optimization_level": level})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(str(tmp_path / "run")), train_curve(ref_dir))
    # What each level ran: level 0 the reference ops and torch's AdamW, 1 and 2 the fused ones.
    (ran,) = [r for r in read_metrics(str(tmp_path / "run")) if "optimizer" in r]
    (ref,) = [r for r in read_metrics(ref_dir) if "optimizer" in r]
    assert (ref["optimization_level"], ref["fused_ops"], ref["optimizer"], ref["optimizer_fast"]) == (
        2, True, "AdamWEMA", True)
    expected = (False, "AdamW") if level == 0 else (True, "AdamWEMA")
    assert (ran["optimization_level"], ran["fused_ops"], ran["optimizer"]) == (level, *expected)
