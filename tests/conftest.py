import os

# Tests share 2 cores: keep each process to its share so they don't fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402

# The multi-process and end-to-end tier: modules that launch training runs or spawn process groups.
# ``make test-fast`` (pytest -m "not slow") runs the rest, the unit tier, in under two minutes.
SLOW_MODULES = {
    "test_chat_convert_cli", "test_compile", "test_context_parallel", "test_context_parallel_model", "test_family_core",
    "test_generate_eval_export", "test_generation", "test_memory", "test_mfu", "test_mixed_modality", "test_packing",
    "test_parallel_layouts", "test_pipeline", "test_robustness", "test_schedule_checkpoint",
    "test_tensor_parallel", "test_training", "test_vlm_lora", "test_wan_parallel", "test_wan_training",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an accelerator (CUDA or NPU); deselected where it is the CPU")


def _accelerator_is_cpu() -> bool:
    from openspeed.accelerator import get_accelerator
    from openspeed.errors import ConfigError

    try:
        return get_accelerator().device_type == "cpu"
    except ConfigError:  # a bad OPENSPEED_DEVICE: the tests that check it report it
        return True
    finally:
        get_accelerator.cache_clear()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    # gpu tests are deselected (reported as such, not as skips) on a machine whose accelerator is the CPU.
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and _accelerator_is_cpu():
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes VQA set with its tiny model directory, shared by the training tests."""
    from openspeed.data.shapes import make_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(out), num=96, seed=1)
    return str(out)


@pytest.fixture(scope="session")
def warm_shapes_dir(shapes_dir, tmp_path_factory):
    """The shapes set with a model trained to above-chance accuracy (20 steps, exported in HF format).

    Layout tests start from it, so their greedy-decoding accuracies are compared on a model that
    answers something: two layouts that both score 0 would agree without proving anything.
    """
    import shutil
    import subprocess
    import sys

    from _train_utils import ROOT, make_tiny_run_config, run_train

    out = str(tmp_path_factory.mktemp("warm_shapes"))
    data = os.path.join(out, "data")
    shutil.copytree(shapes_dir, data, ignore=shutil.ignore_patterns("model"))
    config = make_tiny_run_config(out, shapes_dir, train={"max_steps": 20}, optim={"lr": 5e-3, "warmup_steps": 2},
                                  data={"val_path": None}, checkpoint={"save_final": True})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    export = subprocess.run(
        [sys.executable, "-m", "openspeed", "convert", os.path.join(out, "run"), "--to", "hf",
         "--out", os.path.join(data, "model")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    return data


@pytest.fixture(scope="session")
def reference_run(warm_shapes_dir, tmp_path_factory):
    """One process, 5 fp32 steps from the warm model, checkpoint every 3 steps: what layouts must match.

    Its validation accuracy is above chance (checked), so layouts' accuracies are compared on a model
    that answers some questions right.
    """
    from _train_utils import make_tiny_run_config, read_metrics, run_train

    tmp = str(tmp_path_factory.mktemp("ref"))
    config = make_tiny_run_config(tmp, warm_shapes_dir, checkpoint={"interval": 3, "save_final": False})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = os.path.join(tmp, "run")
    val = [r for r in read_metrics(run_dir) if "val_accuracy" in r][-1]
    assert val["val_accuracy"] > 0.3, val  # chance on these questions is about 0.29
    return run_dir, result
