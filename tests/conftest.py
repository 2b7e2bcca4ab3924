import os

# Tests share 2 cores: keep each process to its share so they don't fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


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
