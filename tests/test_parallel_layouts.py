"""The equivalence matrix: every parallel layout trains the tiny model to one process's losses.

Each layout runs 5 fp32 optimizer steps through the CLI from the same seeded weights and data
order as the single-process reference run (``reference_run`` in conftest), and must give the same
per-step losses within 1e-4 relative, and the same validation loss and greedy-decoding accuracy.
Resharding: a checkpoint written under one layout resumes under another with the uninterrupted
run's losses.
"""

import os

import pytest
from _train_utils import assert_curves_close, make_tiny_run_config, read_metrics, run_train, train_curve

TWO_PROCESS = {
    "tp2": "parallel.tp=2",
    "tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true",
    "pp2_1f1b": "parallel.pp=2 parallel.pp_schedule=1f1b",
    "pp2_interleaved": "parallel.pp=2 parallel.pp_schedule=interleaved_1f1b parallel.virtual_stages=2",
    "cp2_ulysses": "parallel.cp=2 parallel.cp_algo=ulysses",
    "cp2_ring": "parallel.cp=2 parallel.cp_algo=megatron_cp_algo",
    # The reference pads; packing is proven equal to it in test_packing, so one reference serves both.
    "cp2_ring_packed": "parallel.cp=2 parallel.cp_algo=ring data.packing=true",
    "cp2_ring_selective_recompute": "parallel.cp=2 parallel.cp_algo=ring memory.recompute=selective",
    "dp_shard2_memory_savers": (
        "parallel.dp_shard=2 memory.recompute=activation memory.offload_activations=[attention] "
        "memory.offload_optimizer=true"
    ),
}
FOUR_PROCESS = {
    "dp_shard2_tp2": "parallel.dp_shard=2 parallel.tp=2 parallel.sequence_parallel=true",
    "pp2_tp2": "parallel.pp=2 parallel.tp=2",
    "hsdp_2x2": "parallel.dp_replicate=2 parallel.dp_shard=2",
    "pp2_dp_shard2": "parallel.pp=2 parallel.dp_shard=2",
    "cp4_hybrid_2x2": "parallel.cp=4 parallel.cp_algo=hybrid_cp_algo parallel.cp_ulysses_degree=2",
    "cp2_dp_shard2": "parallel.cp=2 parallel.cp_algo=ring parallel.dp_shard=2",
    "cp2_tp2_sp": "parallel.cp=2 parallel.cp_algo=ulysses parallel.tp=2 parallel.sequence_parallel=true",
}


def _check_against_reference(run_dir: str, ref_dir: str) -> None:
    assert_curves_close(train_curve(run_dir), train_curve(ref_dir))
    val = [r for r in read_metrics(run_dir) if "val_loss" in r][-1]
    ref_val = [r for r in read_metrics(ref_dir) if "val_loss" in r][-1]
    assert val["val_loss"] == pytest.approx(ref_val["val_loss"], rel=1e-4)
    assert val["val_accuracy_n"] == ref_val["val_accuracy_n"]
    assert val["val_accuracy"] == ref_val["val_accuracy"]


@pytest.mark.parametrize("layout", list(TWO_PROCESS), ids=list(TWO_PROCESS))
def test_two_process_layout_matches_one_process(layout, reference_run, warm_shapes_dir, tmp_path):
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir)
    result = run_train(config, "--nproc", "2", *TWO_PROCESS[layout].split())
    assert result.returncode == 0, result.stderr[-3000:]
    _check_against_reference(str(tmp_path / "run"), ref_dir)


@pytest.mark.parametrize("layout", list(FOUR_PROCESS), ids=list(FOUR_PROCESS))
def test_four_process_layout_matches_one_process(layout, reference_run, warm_shapes_dir, tmp_path):
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir)
    result = run_train(config, "--nproc", "4", *FOUR_PROCESS[layout].split(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_against_reference(str(tmp_path / "run"), ref_dir)


@pytest.mark.parametrize(
    ("saved_under", "resumed_under"),
    [
        (["--nproc", "2", "parallel.tp=2"], ["--nproc", "2", "parallel.dp_shard=2"]),
        (["--nproc", "2", "parallel.pp=2"], []),
    ],
    ids=["tp2_to_dp_shard2", "pp2_to_one_process"],
)
def test_checkpoint_resumes_under_another_layout(saved_under, resumed_under, reference_run, warm_shapes_dir,
                                                 tmp_path):
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir)
    first = run_train(config, *saved_under, "train.exit_interval=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_3")
    second = run_train(config, *resumed_under, "train.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step 3" in second.stderr
    # Steps 4-5 continue from the resharded weights and optimizer state exactly as one process would.
    assert_curves_close(train_curve(str(tmp_path / "run")), train_curve(ref_dir))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["parallel.tp=3"], "parallel.tp=3"),
        (["parallel.pp=2", "parallel.pipeline_num_layers=1,1,1"], "parallel.pipeline_num_layers"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "parallel.virtual_stages"),
        (["parallel.cp=2", "parallel.cp_algo=hybrid"], "parallel.cp_algo=hybrid"),
        (["parallel.cp=2", "parallel.pp=2"], "parallel.cp=2 with parallel.pp=2"),
    ],
    ids=["tp_does_not_divide", "bad_layer_list", "interleaved_without_virtual_stages", "hybrid_without_degree",
         "cp_with_pp"],
)
def test_bad_layouts_are_one_line_errors(args, message, shapes_dir, tmp_path):
    config = make_tiny_run_config(str(tmp_path), shapes_dir)
    nproc = "3" if "parallel.tp=3" in args else "4" if "parallel.pp=2" in args and "parallel.cp=2" in args else "2"
    result = run_train(config, "--nproc", nproc, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


def test_adaptive_recompute_fits_the_budget_and_keeps_the_losses(reference_run, warm_shapes_dir, tmp_path):
    # Per rank the tiny model (with its parameters and optimizer state) keeps ~8.5 MB without recompute and
    # ~6.4 MB with every layer recomputed: 0.0075 GiB needs some layers recomputed, on both ranks alike.
    ref_dir, _ = reference_run
    config = make_tiny_run_config(str(tmp_path), warm_shapes_dir)
    result = run_train(config, "--nproc", "2", "parallel.dp_shard=2", "memory.budget_gb=0.0075")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(str(tmp_path / "run")), train_curve(ref_dir))
    choice = [r for r in read_metrics(str(tmp_path / "run")) if "adaptive_recompute" in r]
    assert len(choice) == 1 and choice[0]["step"] == 1
    assert 0 < len(choice[0]["adaptive_recompute"]) and choice[0]["adaptive_estimated_gb"] <= 0.0075
    impossible = run_train(config, "memory.budget_gb=0.001", f"train.run_dir={tmp_path / 'impossible'}")
    assert impossible.returncode == 2
    errors = [line for line in impossible.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "memory.budget_gb=0.001 cannot be met" in errors[0], impossible.stderr[-2000:]


# LoRA (model.lora, rank 4 on the LLM and the vision tower, base drawn from the seed): the adapters split
# with their base layers under tp + sp, go with their stage under pp and are untouched by cp; each
# layout gives the one-process LoRA run's losses (tp2 and dp_shard2 are in test_vlm_lora.py).
LORA_LAYOUTS = {
    "lora_tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true",
    "lora_pp2": "parallel.pp=2",
    "lora_cp2_ring": "parallel.cp=2 parallel.cp_algo=ring",
}


def _lora_config(tmp_path, shapes_dir) -> str:
    return make_tiny_run_config(
        str(tmp_path), shapes_dir, model={"lora": {"rank": 4, "alpha": 8}}, optim={"lr": 2e-2},
        data={"val_path": ""}, checkpoint={"interval": 3},
    )


@pytest.fixture(scope="module")
def lora_reference(shapes_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_ref")
    result = run_train(_lora_config(tmp, shapes_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return train_curve(str(tmp / "run"))


@pytest.mark.parametrize("layout", list(LORA_LAYOUTS), ids=list(LORA_LAYOUTS))
def test_lora_layout_matches_one_process(layout, lora_reference, shapes_dir, tmp_path):
    result = run_train(_lora_config(tmp_path, shapes_dir), "--nproc", "2", *LORA_LAYOUTS[layout].split())
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(str(tmp_path / "run")), lora_reference)


def test_lora_checkpoint_resumes_under_another_layout(lora_reference, shapes_dir, tmp_path):
    # The checkpoint holds the adapters and their optimizer state only; the frozen base is rebuilt.
    config = _lora_config(tmp_path, shapes_dir)
    first = run_train(config, "--nproc", "2", "parallel.tp=2", "train.exit_interval=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(config, "--nproc", "2", "parallel.dp_shard=2", "train.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step 3" in second.stderr
    assert_curves_close(train_curve(str(tmp_path / "run")), lora_reference)
