"""Sample schedule and checkpoint bookkeeping (no model needed)."""

import os

import pytest

from openspeed.data.schedule import GlobalBatchSchedule
from openspeed.training import checkpoint as ckpt


def test_global_batch_is_independent_of_dp_size():
    schedule = GlobalBatchSchedule(num_samples=37, global_batch_size=8, seed=3)
    for step in (1, 2, 5, 9):  # step 5 crosses an epoch boundary (37 samples)
        expected = schedule.global_batch(step)
        for dp in (1, 2, 4):
            for mbs in (1, 2):
                got = []
                for rank in range(dp):
                    for micro in schedule.micro_batches(step, rank, dp, mbs):
                        assert len(micro) == mbs
                        got.extend(micro)
                assert got == expected


def test_each_epoch_is_a_permutation():
    schedule = GlobalBatchSchedule(num_samples=16, global_batch_size=4, seed=0)
    epoch = [i for step in range(1, 5) for i in schedule.global_batch(step)]
    assert sorted(epoch) == list(range(16))
    assert epoch != list(range(16))
    again = GlobalBatchSchedule(num_samples=16, global_batch_size=4, seed=0)
    assert again.global_batch(3) == schedule.global_batch(3)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_2", True), ("step_4", True), ("step_6.incomplete", True), ("step_8", False)):
        os.makedirs(root / name)
        if complete:
            (root / name / ckpt.TRAIN_STATE).write_text("{}")
    assert [s for s, _ in ckpt.list_complete(str(tmp_path))] == [2, 4]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_4")
    assert ckpt.latest_checkpoint(str(tmp_path / "nothing")) is None


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owns:
        dist.destroy_process_group()


def _save(run_dir, step, run_id, **kwargs):
    import torch

    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    return ckpt.save_checkpoint(ckpt.checkpoint_root(str(run_dir)), step, [model], [optim], {"run_id": run_id},
                                {"numbers": [step]}, **kwargs)


def test_keep_last_prunes_only_its_own_run(tmp_path, one_process_group):
    _save(tmp_path, 1, "other-run")
    for step in (2, 3, 4):
        _save(tmp_path, step, "this-run", keep_last=2)
    kept = {s: ckpt.run_id_of(p) for s, p in ckpt.list_complete(str(tmp_path))}
    assert kept == {1: "other-run", 3: "this-run", 4: "this-run"}


def test_resaving_a_step_never_leaves_it_without_a_complete_checkpoint(tmp_path, one_process_group, monkeypatch):
    _save(tmp_path, 2, "run")
    seen = []
    real_replace = os.replace

    def watched_replace(src, dst):
        seen.append([s for s, _ in ckpt.list_complete(str(tmp_path))])
        real_replace(src, dst)
        seen.append([s for s, _ in ckpt.list_complete(str(tmp_path))])

    monkeypatch.setattr(ckpt.os, "replace", watched_replace)
    _save(tmp_path, 2, "run")
    assert len(seen) == 4 and all(steps == [2] for steps in seen), seen
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2"]
    # A crash between the two renames leaves step_2.replaced: still found, still complete.
    real_replace(tmp_path / "checkpoints" / "step_2", tmp_path / "checkpoints" / "step_2.replaced")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_2.replaced")


def test_checkpoint_files_of_ours_hold_no_pickle(tmp_path, one_process_group):
    import json
    import random

    import numpy as np
    import torch

    from openspeed.accelerator import get_accelerator
    from openspeed.training.trainer import _restore_rng, _rng_state

    acc = get_accelerator()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    state = _rng_state(acc)
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    path = ckpt.save_checkpoint(ckpt.checkpoint_root(str(tmp_path)), 1, [torch.nn.Linear(2, 2)], [None],
                                {"run_id": "r"}, state)
    ours = []
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".distcp") or name == ".metadata":
                continue  # DCP's own files (docs/checkpoints.md says which it unpickles)
            ours.append(os.path.relpath(os.path.join(folder, name), path))
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                json.load(fh)  # plain JSON, not a pickle
    assert sorted(ours) == sorted([ckpt.TRAIN_STATE, os.path.join("rng", "rank0.json")])
    _, rng = ckpt.load_checkpoint(path, [torch.nn.Linear(2, 2)], [None])
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    _restore_rng(acc, rng)
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_a_fresh_start_refuses_a_used_run_dir(tmp_path, monkeypatch):
    from openspeed.config import RunConfig
    from openspeed.errors import ConfigError
    from openspeed.training.run_dir import check_run_dir, prepare_run_dir

    cfg = RunConfig()
    cfg.train.run_dir = str(tmp_path / "run")
    check_run_dir(cfg)  # no directory yet
    os.makedirs(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    check_run_dir(cfg)  # a run that never trained holds nothing to lose
    (tmp_path / "run" / "checkpoints" / "step_1").mkdir()
    with pytest.raises(ConfigError, match="already holds a run .checkpoints/.; continue it with train.resume=auto"):
        check_run_dir(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted worker group resumes instead
    check_run_dir(cfg)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    cfg.train.resume = "auto"
    check_run_dir(cfg)
    cfg.train.resume, cfg.train.overwrite = "none", True
    assert prepare_run_dir(cfg) == str(tmp_path / "run.previous")
    assert not (tmp_path / "run").exists() and (tmp_path / "run.previous" / "checkpoints" / "step_1").is_dir()
