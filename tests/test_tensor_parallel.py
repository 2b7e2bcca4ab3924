"""Tensor (+ sequence) parallel Qwen2.5-VL must match one process: loss, logits, every gradient.

Workers are CPU processes on gloo (``torch.multiprocessing.spawn``), one thread each. Every model starts
from the same full weights (name-seeded, copied into the local shards with ``copy_full_into``).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from _qwen_tiny import (
    IMAGE_BATCH,
    VIDEO_BATCH,
    make_batch,
    native_config,
)
from _spawn import run_workers

from openspeed.errors import ConfigError
from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLModel
from openspeed.models.qwen2_5_vl.parallelize import check_tensor_parallel_sizes

# Gradients/losses must agree to this, relative to the largest |value| of the reference tensor.
REL_TOL = 1e-5


def _config(tie_word_embeddings: bool = False) -> Qwen2_5_VLConfig:
    return native_config(tie_word_embeddings)


def test_non_dividing_tp_is_one_line_config_error():
    config = _config()
    check_tensor_parallel_sizes(config, 1)
    check_tensor_parallel_sizes(config, 2)
    with pytest.raises(ConfigError) as info:
        check_tensor_parallel_sizes(config, 3)
    assert str(info.value) == "parallel.tp=3 does not divide text num_attention_heads=4"
    with pytest.raises(ConfigError, match=r"^parallel.tp=4 does not divide text num_key_value_heads=2$"):
        check_tensor_parallel_sizes(config, 4)
    config.text.num_key_value_heads = 4
    with pytest.raises(ConfigError, match=r"^parallel.tp=4 does not divide vision num_heads=2$"):
        check_tensor_parallel_sizes(config, 4)


# --------------------------------------------------------------------------------------------------
# Multi-process helpers (run inside the spawned workers)
# --------------------------------------------------------------------------------------------------


def _full_value(name: str, shape: torch.Size) -> torch.Tensor:
    """Deterministic non-trivial weights: norms near 1, biases non-zero (so bias handling shows)."""
    from openspeed.models.init import param_generator

    gen = param_generator(11, name)
    noise = torch.empty(shape).normal_(0.0, 1.0, generator=gen)
    if len(shape) == 1 and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    return 0.08 * noise


def _init(model: torch.nn.Module) -> None:
    from openspeed.models.init import copy_full_into

    for name, param in model.named_parameters():
        copy_full_into(param, _full_value(name, param.shape))


def _reference(config: Qwen2_5_VLConfig, batch: dict, num_items: int):
    model = Qwen2_5_VLModel(config)
    _init(model)
    out = model(**batch, num_items_in_batch=num_items)
    out.loss.backward()
    return model, out


def _build_parallel(config: Qwen2_5_VLConfig, dims, sequence_parallel: bool) -> torch.nn.Module:
    """As ``build_training_model`` does it: meta -> parallelize -> to_empty -> buffers -> init."""
    from openspeed.models.qwen2_5_vl import reset_non_persistent_buffers
    from openspeed.models.qwen2_5_vl.parallelize import parallelize

    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    cfg = SimpleNamespace(parallel=SimpleNamespace(sequence_parallel=sequence_parallel, zero_stage=3),
                          train=SimpleNamespace(precision="fp32"))
    parallelize(model, dims, cfg)
    model.to_empty(device="cpu")
    reset_non_persistent_buffers(model)
    _init(model)
    return model


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-12))


def _check_grads(model, ref_model, diffs: dict, key: str) -> None:
    from torch.distributed.tensor import DTensor

    ref_params = dict(ref_model.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        ref = ref_params[name]
        full = param.full_tensor() if isinstance(param, DTensor) else param
        assert torch.equal(full.detach(), ref.detach()), f"{name}: full value differs from the reference"
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        rel = _rel(grad, ref.grad)
        assert rel < REL_TOL, f"{key} {name}: gradient differs by {rel:.2e} (relative)"
        worst = max(worst, rel)
    diffs[f"{key}/grad"] = worst


def _grad_norm(params) -> float:
    from openspeed.training.grads import clip_grad_norm

    return clip_grad_norm(list(params), 0.0)


def _dims(sizes: dict[str, int]):
    from openspeed.distributed.mesh import build_mesh

    full = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1, **sizes}
    return build_mesh(full, "cpu")


def _dcp_roundtrip(model, ref_model, ckpt_dir: str, reload: bool = True) -> None:
    """Save the parallel model with DCP, load into plain tensors (and back into the layout)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt_dir)
    dist.barrier()
    ref_sd = ref_model.state_dict()
    plain = {"model": {k: torch.zeros_like(v) for k, v in ref_sd.items()}}
    dcp.load(plain, checkpoint_id=ckpt_dir)
    for name, value in ref_sd.items():
        assert torch.equal(plain["model"][name], value), f"{name}: DCP value differs from the reference"
    if not reload:
        return
    # And back into a sharded model (the qkv weights are stored in HF row order, Shard(0)).
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, sd)
    for name, param in model.named_parameters():
        assert torch.equal(param.full_tensor(), ref_sd[name]), f"{name}: DCP reload differs"


def _num_items(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _tp_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.tensor_parallel import full_logits, loss_context

    dims = _dims({"tp": 2})
    tp_mesh = dims.mesh["tp"]
    diffs: dict[str, float] = {}
    # Images of two sizes + padding (odd length 37: uneven sequence shards), and videos + an image.
    for batch_name, samples in (("image", IMAGE_BATCH), ("video", VIDEO_BATCH)):
        batch = make_batch(samples, seed=1)
        num_items = _num_items(batch)
        for tie in (False, True):
            config = _config(tie_word_embeddings=tie)
            ref_model, ref_out = _reference(config, batch, num_items)
            for sp in (False, True):
                if batch_name == "video" and not (sp and not tie):
                    continue  # the video batch: one layout is enough
                key = f"{batch_name}/tie={int(tie)}/sp={int(sp)}"
                model = _build_parallel(config, dims, sp)
                for name, param in model.named_parameters():
                    assert isinstance(param, DTensor) and param.device_mesh == tp_mesh, name
                if tie:
                    assert model.lm_head.weight is model.language_model.embed_tokens.weight
                with loss_context(model):
                    out = model(**batch, num_items_in_batch=num_items)
                    assert not isinstance(out.loss, DTensor)
                    out.loss.backward()
                assert isinstance(out.logits, DTensor)
                diffs[f"{key}/loss"] = _rel(out.loss, ref_out.loss)
                assert diffs[f"{key}/loss"] < REL_TOL, (key, out.loss.item(), ref_out.loss.item())
                diffs[f"{key}/logits"] = _rel(full_logits(out.logits), ref_out.logits)
                assert diffs[f"{key}/logits"] < REL_TOL
                _check_grads(model, ref_model, diffs, key)
                norm, ref_norm = _grad_norm(model.parameters()), _grad_norm(ref_model.parameters())
                diffs[f"{key}/grad_norm"] = abs(norm - ref_norm) / ref_norm
                assert diffs[f"{key}/grad_norm"] < REL_TOL, (norm, ref_norm)
                if batch_name == "image" and sp and not tie:
                    # Greedy-decoding style forward: no labels, no loss context, gathered logits.
                    with torch.no_grad():
                        inputs = {k: v for k, v in batch.items() if k != "labels"}
                        logits = full_logits(model(**inputs).logits)
                    diffs["generate/logits"] = _rel(logits, ref_out.logits)
                    assert diffs["generate/logits"] < REL_TOL
                    assert torch.equal(logits[:, -1].argmax(-1), ref_out.logits[:, -1].argmax(-1))
                    _dcp_roundtrip(model, ref_model, os.path.join(out_dir, "dcp_tp"))
                    # Clipping scales the DTensor gradients as torch's clipping scales the plain ones.
                    from openspeed.training.grads import clip_grad_norm

                    clip_grad_norm(list(model.parameters()), ref_norm / 2)
                    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), ref_norm / 2)
                    _check_grads(model, ref_model, diffs, "clipped")
                    # One AdamW step over the DTensor parameters tracks the reference step. A large
                    # eps: with the default, elements whose gradient is ~1e-8 (summation-order noise
                    # of a few 1e-10) get visibly different normalised updates.
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)
                    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, eps=1e-3)
                    opt.step()
                    ref_opt.step()
                    ref_params = dict(ref_model.named_parameters())
                    step_diffs = {
                        n: _rel(p.full_tensor(), ref_params[n]) for n, p in model.named_parameters()
                    }
                    diffs["adamw/param"] = max(step_diffs.values())
                    worst = {n: d for n, d in step_diffs.items() if d >= REL_TOL}
                    assert diffs["adamw/param"] < REL_TOL, worst
    # Parts frozen before the plan (model.freeze) stay frozen, whatever style re-creates them.
    from openspeed.models.qwen2_5_vl.parallelize import apply_tensor_parallel

    for sp in (False, True):
        with torch.device("meta"):
            model = Qwen2_5_VLModel(_config())
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith(("visual.", "language_model.norm")))
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sp)
        for name, param in model.named_parameters():
            assert isinstance(param, DTensor), name
            assert param.requires_grad == (not name.startswith(("visual.", "language_model.norm"))), name
    if rank == 0:
        with open(os.path.join(out_dir, "diffs_tp.json"), "w", encoding="utf-8") as fh:
            json.dump(diffs, fh)


def _fsdp_tp_worker(rank: int, out_dir: str) -> None:
    """dp_shard=2 x tp=2: each data-parallel rank takes one sample; sums match the 2-sample batch."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.tensor_parallel import full_logits, loss_context

    dims = _dims({"dp_shard": 2, "tp": 2})
    config = _config(tie_word_embeddings=True)
    full_batch = make_batch(IMAGE_BATCH, seed=1)
    num_items = _num_items(full_batch)
    ref_model, ref_out = _reference(config, full_batch, num_items)
    dp_rank = dims.dp_rank()
    batch = make_batch(IMAGE_BATCH[dp_rank : dp_rank + 1], seed=1)
    # make_batch draws pixels per batch: take this sample's rows of the full batch instead.
    n_patches = int(full_batch["image_grid_thw"][:1].prod(-1).sum())
    own = slice(0, n_patches) if dp_rank == 0 else slice(n_patches, None)
    batch["pixel_values"] = full_batch["pixel_values"][own]
    length = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        batch[key] = full_batch[key][dp_rank : dp_rank + 1, :length]

    diffs: dict[str, float] = {}
    model = _build_parallel(config, dims, sequence_parallel=True)
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) and param.device_mesh.mesh_dim_names[-1] == "tp", name
    with loss_context(model):
        out = model(**batch, num_items_in_batch=num_items)
        out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=dims.dp_group())
    diffs["fsdp_tp/loss"] = _rel(loss, ref_out.loss)
    assert diffs["fsdp_tp/loss"] < REL_TOL, (loss.item(), ref_out.loss.item())
    own_logits = ref_out.logits[dp_rank : dp_rank + 1, :length]
    diffs["fsdp_tp/logits"] = _rel(full_logits(out.logits), own_logits)
    assert diffs["fsdp_tp/logits"] < REL_TOL
    _check_grads(model, ref_model, diffs, "fsdp_tp")
    norm, ref_norm = _grad_norm(model.parameters()), _grad_norm(ref_model.parameters())
    diffs["fsdp_tp/grad_norm"] = abs(norm - ref_norm) / ref_norm
    assert diffs["fsdp_tp/grad_norm"] < REL_TOL, (norm, ref_norm)
    _dcp_roundtrip(model, ref_model, os.path.join(out_dir, "dcp_fsdp_tp"), reload=False)
    if rank == 0:
        with open(os.path.join(out_dir, "diffs_fsdp_tp.json"), "w", encoding="utf-8") as fh:
            json.dump(diffs, fh)


def _spawn(fn, world: int, out_dir: str) -> dict[str, float]:
    run_workers(fn, world, out_dir)
    name = "diffs_tp.json" if fn is _tp_worker else "diffs_fsdp_tp.json"
    with open(os.path.join(out_dir, name), encoding="utf-8") as fh:
        diffs = json.load(fh)
    for key, value in sorted(diffs.items()):
        print(f"{key}: {value:.2e}")
    return diffs


def test_tensor_parallel_matches_one_process(tmp_path):
    """tp=2, with and without sequence parallelism, tied and untied embeddings, images and videos."""
    diffs = _spawn(_tp_worker, 2, str(tmp_path))
    assert max(diffs.values()) < REL_TOL


def test_tensor_parallel_under_fsdp_matches_one_process(tmp_path):
    """FSDP2 (dp_shard=2) on top of tp=2 + sequence parallel: 4 processes, one 5-D mesh."""
    diffs = _spawn(_fsdp_tp_worker, 4, str(tmp_path))
    assert max(diffs.values()) < REL_TOL
