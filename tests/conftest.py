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
