"""Sample schedule and checkpoint bookkeeping (no model needed)."""

import os

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
