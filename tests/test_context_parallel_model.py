"""Context parallel applied to the whole Qwen2.5-VL model: loss and every gradient equal one process.

Two gloo workers split both the language model's sequence (the run's algorithm) and the vision
tower's packed patches (Ulysses); the test also checks that the vision blocks really ran on half of
the patches. The tiny model and weights are those of ``test_tensor_parallel``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _qwen_tiny import IMAGE_BATCH, PAD_ID, make_batch
from _spawn import run_workers
from test_tensor_parallel import _build_parallel, _config, _reference, _rel

REL_TOL = 1e-5
ALGORITHMS = ("ulysses", "ring")


def _pad_to(batch: dict, multiple: int) -> dict:
    """Right-pad the batch's sequence to a multiple of ``multiple`` (what the trainer's collator does)."""
    seq = batch["input_ids"].shape[1]
    extra = -seq % multiple
    if not extra:
        return batch
    fill = {"input_ids": PAD_ID, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}
    out = dict(batch)
    for key, value in fill.items():
        if key in batch:
            out[key] = torch.cat([batch[key], torch.full((batch[key].shape[0], extra), value)], dim=1)
    return out


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.mesh import build_mesh

    diffs = {}
    config = _config()
    batch = _pad_to(make_batch(IMAGE_BATCH, seed=5), 4)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    ref_model, ref_out = _reference(config, batch, num_items)
    num_patches = int(batch["pixel_values"].shape[0])
    for algo in ALGORITHMS:
        sizes = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 1}
        dims = build_mesh(sizes, "cpu", cp_algo=algo)
        model = _build_parallel(config, dims, sequence_parallel=False)
        seen = []
        model.visual.blocks[0].attn.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0].shape[0]))
        out = model(**batch, num_items_in_batch=num_items)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)  # each rank's loss is its tokens' share of the global sum
        out.loss.backward()
        assert seen == [num_patches // 2], (seen, num_patches)
        diffs[f"{algo}/loss"] = _rel(loss, ref_out.loss)
        ref_params = dict(ref_model.named_parameters())
        worst = 0.0
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            rel = _rel(grad, ref_params[name].grad)
            assert rel < REL_TOL, f"{algo} {name}: gradient differs by {rel:.2e} (relative)"
            worst = max(worst, rel)
        diffs[f"{algo}/grad"] = worst
    if rank == 0:
        with open(os.path.join(out_dir, "diffs_cp.json"), "w", encoding="utf-8") as fh:
            json.dump(diffs, fh)


@pytest.mark.parametrize("world", [2])
def test_context_parallel_model_matches_one_process(world, tmp_path):
    run_workers(_worker, world, str(tmp_path))
    with open(tmp_path / "diffs_cp.json", encoding="utf-8") as fh:
        diffs = json.load(fh)
    for key, value in sorted(diffs.items()):
        print(f"{key}: {value:.2e}")
    assert max(diffs.values()) < REL_TOL
