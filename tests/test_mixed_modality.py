"""Mixed data never hangs a collective: text-only, image and video samples side by side.

Real instruction sets mix text-only rows with image and video rows, so in a step one data-parallel
rank may hold no image while another holds a video, and a micro-batch may be text-only. Every
layout must still run the same vision-tower work on every rank (the model runs its tower once per
forward, on a blank block when the batch has no media) and train exactly as one process does: the
same loss and gradient norm in each of 5 fp32 steps.
"""

from __future__ import annotations

import os

import pytest
from _mixed import write_mixed_set
from _train_utils import assert_curves_close, run_train, train_curve

LAYOUTS = {
    "dp_shard2": "parallel.dp_shard=2",
    "tp2_sp": "parallel.tp=2 parallel.sequence_parallel=true",
    "pp2": "parallel.pp=2",
    "cp2_ring": "parallel.cp=2 parallel.cp_algo=ring",
}


@pytest.fixture(scope="module")
def mixed(shapes_dir, tmp_path_factory):
    """(config path, one-process curve) over the mixed set of :func:`_mixed.write_mixed_set`."""
    root = str(tmp_path_factory.mktemp("mixed"))
    config = write_mixed_set(shapes_dir, root)
    result = run_train(config, "train.run_dir=" + os.path.join(root, "one"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped samples: 0" in result.stderr
    return config, train_curve(os.path.join(root, "one"))


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_mixed_modalities_train_as_one_process(layout, mixed, tmp_path):
    config, reference = mixed
    run_dir = str(tmp_path / "run")
    result = run_train(config, "--nproc", "2", *LAYOUTS[layout].split(), "train.run_dir=" + run_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curves_close(train_curve(run_dir), reference)
    # The text-only step 4 still moved the weights: its loss is not step 3's.
    assert reference[4][0] != reference[3][0]
