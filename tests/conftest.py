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
    "test_chat_convert_cli", "test_context_parallel", "test_context_parallel_model", "test_family_core",
    "test_generate_eval_export", "test_generation", "test_memory", "test_mfu", "test_packing",
    "test_parallel_layouts", "test_pipeline", "test_robustness", "test_schedule_checkpoint",
    "test_tensor_parallel", "test_training", "test_vlm_lora", "test_wan_parallel", "test_wan_training",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes VQA set with its tiny model directory, shared by the training tests."""
    from openspeed.data.shapes import make_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(out), num=96, seed=1)
    return str(out)


@pytest.fixture(scope="session")
def reference_run(shapes_dir, tmp_path_factory):
    """One process, 5 fp32 steps of the tiny model, checkpoint every 3 steps: what layouts must match."""
    from _train_utils import make_tiny_run_config, run_train

    tmp = str(tmp_path_factory.mktemp("ref"))
    config = make_tiny_run_config(tmp, shapes_dir, checkpoint={"interval": 3, "save_final": False})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(tmp, "run"), result
