"""Memory savers (``openspeed.memory``) on the tiny Qwen2.5-VL: recompute modes, activation and optimizer
offload, adaptive recompute, and the saved-bytes meter that measures them.

Every saver must leave the numbers alone (the loss and every parameter gradient of the plain model,
within 1e-6 in fp32) and keep strictly fewer bytes saved for backward on the device, as the meter
counts them (on the CPU the host is the device, so process memory would show nothing).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _qwen_tiny import (
    IMAGE_BATCH,
    make_batch,
    native_config,
)
from _spawn import run_workers

from openspeed.errors import ConfigError
from openspeed.memory import (
    OffloadedAdamW,
    SavedBytesMeter,
    apply_activation_offload,
    apply_adaptive,
    apply_recompute,
    max_over_ranks,
    measure_layers,
    optimizer_state_bytes,
    plan_adaptive,
)
from openspeed.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLModel
from openspeed.models.qwen2_5_vl.memory_plan import memory_plan

TOL = 1e-6  # fp32: loss and gradients of a saver vs the plain model (absolute)


def _config() -> Qwen2_5_VLConfig:
    return native_config()


def _weights() -> dict[str, torch.Tensor]:
    """Fixed weights with norm scales away from 1 and non-zero biases (so every part matters)."""
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return {k: v.clone() for k, v in model.state_dict().items()}


WEIGHTS = _weights()
# Two samples with images of different shapes (partial windows) and right padding: the vision tower's
# windowed and full attention and the decoder's padding mask all run.
BATCH = make_batch(IMAGE_BATCH, seed=1)
NUM_ITEMS = int((BATCH["labels"][:, 1:] != -100).sum())


def _model(meta: bool = False) -> Qwen2_5_VLModel:
    """A fresh model with ``WEIGHTS`` (``meta``: built on the meta device; call ``_materialise``)."""
    if meta:
        with torch.device("meta"):
            return Qwen2_5_VLModel(_config())
    model = Qwen2_5_VLModel(_config())
    model.load_state_dict(WEIGHTS)
    return model


def _materialise(model: Qwen2_5_VLModel) -> None:
    from openspeed.models.qwen2_5_vl import reset_non_persistent_buffers

    model.to_empty(device="cpu")
    reset_non_persistent_buffers(model)
    model.load_state_dict(WEIGHTS)


def _step(model: Qwen2_5_VLModel):
    """One measured forward + backward: (report, loss, {name: grad})."""
    report, out = measure_layers(model, memory_plan(model), lambda: model(**BATCH, num_items_in_batch=NUM_ITEMS))
    out.loss.backward()
    return report, out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _max_diff(grads: dict, ref: dict) -> float:
    assert grads.keys() == ref.keys()
    return max(float((grads[n] - ref[n]).abs().max()) for n in ref)


@pytest.fixture(scope="module")
def reference():
    return _step(_model())


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_memory_config_keys_and_one_line_errors():
    from openspeed.config import MemoryConfig, from_dict

    cfg = from_dict(
        {
            "memory": {
                "recompute": "activation",
                "recompute_num_layers": 2,
                "offload_activations": "text.attention,vision.mlp",
                "offload_optimizer": True,
            }
        }
    )
    assert cfg.memory.offload_activations == ["text.attention", "vision.mlp"]
    cfg.memory.check()
    with pytest.raises(ConfigError, match=r"^memory.recompute: expected one of none, selective, full, activation"):
        from_dict({"memory": {"recompute": "partial"}})
    bad = {
        "memory.budget_gb: must be positive, got 0.0": MemoryConfig(budget_gb=0.0),
        "memory.recompute_num_layers: must not be negative, got -1": MemoryConfig(recompute_num_layers=-1),
        "memory.budget_gb chooses what to recompute itself: leave memory.recompute at none (got full)": (
            MemoryConfig(budget_gb=8.0, recompute="full")
        ),
        "memory.offload_master_weights needs memory.offload_optimizer=true": MemoryConfig(
            offload_master_weights=True
        ),
    }
    for message, memory in bad.items():
        with pytest.raises(ConfigError) as info:
            memory.check()
        assert str(info.value) == message


# --------------------------------------------------------------------------------------------------
# The meter
# --------------------------------------------------------------------------------------------------


def test_meter_counts_each_storage_once_and_skips_parameters():
    from torch.utils.checkpoint import checkpoint

    from openspeed.memory.recompute import selective_context_fn

    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedBytesMeter(device="cpu") as meter:
        y = x.exp()  # exp saves its output y: 4*8 fp32 = 128 bytes
        z = y * y  # mul saves y twice: the same storage, counted once
        w = lin(z)  # linear saves z (128 bytes) and a view of its weight (a parameter: not counted)
        v = w[:, :8].sin()  # sin saves a view of w: w's whole storage (4*16*4 = 256 bytes) counts
    assert meter.report.device == 128 + 128 + 256 and meter.report.host == 0
    (v.sum() + w.sum()).backward()

    # A checkpointed region keeps only its inputs; a selective one also the matmul outputs it keeps.
    def region(t):
        return lin(t.exp()).relu().sin()

    with SavedBytesMeter(device="cpu") as meter:
        checkpoint(region, x, use_reentrant=False)
    assert meter.report.device == 4 * 8 * 4
    with SavedBytesMeter(device="cpu") as meter:
        checkpoint(region, x, use_reentrant=False, context_fn=selective_context_fn())
    assert meter.report.device == 4 * 8 * 4 + 4 * 16 * 4  # x and the mm output


def test_meter_attributes_bytes_to_layers(reference):
    report, _, _ = reference
    plan = memory_plan(_model())
    assert set(report.per_module) == set(plan.layer_names())
    per_layer = sum(b.device for b in report.per_module.values())
    # Embeddings, merger, logits and loss are outside the layers; the parts add up to the total.
    assert 0 < per_layer < report.device and per_layer + report.unattributed.device == report.device
    for name, b in report.per_module.items():
        assert 0 < b.inputs < b.device, name


# --------------------------------------------------------------------------------------------------
# Recompute
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [False, True], ids=["materialised", "meta-built"])
def test_recompute_modes_match_and_keep_fewer_bytes(reference, meta):
    ref_report, ref_loss, ref_grads = reference
    names = list(_model().state_dict())
    saved = {"none": ref_report.device}
    for mode in ("full", "selective", "activation", "norm"):
        model = _model(meta)
        regions = apply_recompute(model, mode, plan=memory_plan(model))
        assert regions, mode
        if meta:
            _materialise(model)
        assert list(model.state_dict()) == names  # names unchanged: checkpoints and init by name work
        report, loss, grads = _step(model)
        assert abs(float(loss - ref_loss)) <= TOL, mode
        assert _max_diff(grads, ref_grads) <= TOL, mode
        saved[mode] = report.device
        if mode == "full":
            # A fully recomputed layer keeps exactly what it was called with.
            for name, b in report.per_module.items():
                assert b.device <= b.inputs, (name, b)
    print({k: v for k, v in saved.items()})
    for mode in ("selective", "activation", "norm"):
        assert saved["full"] < saved[mode] < saved["none"], (mode, saved)


def test_recompute_num_layers_takes_the_first_layers_of_each_stack(reference):
    ref_report, _, ref_grads = reference
    saved = {}
    for num_layers in (1, 2):
        model = _model()
        regions = apply_recompute(model, "full", num_layers, plan=memory_plan(model))
        expected = [f"visual.blocks.{i}" for i in range(num_layers)]
        expected += [f"language_model.layers.{i}" for i in range(num_layers)]
        assert regions == expected
        report, _, grads = _step(model)
        assert _max_diff(grads, ref_grads) <= TOL
        saved[num_layers] = report.device
        # Layers past the first N are left alone: they keep what they kept without recompute.
        assert report.per_module["visual.blocks.3"].device == ref_report.per_module["visual.blocks.3"].device
        assert report.per_module["visual.blocks.0"].device < ref_report.per_module["visual.blocks.0"].device
    assert saved[1] < ref_report.device and saved[2] < saved[1]

    model = _model()
    assert apply_recompute(model, "selective", 0, plan=memory_plan(model)) == []
    assert apply_recompute(model, "none", plan=memory_plan(model)) == []
    with pytest.raises(ConfigError, match=r"^memory.recompute: expected one of .*, got 'partial'$"):
        apply_recompute(model, "partial", plan=memory_plan(model))


# --------------------------------------------------------------------------------------------------
# Activation offload
# --------------------------------------------------------------------------------------------------


def test_activation_offload_keeps_grads_and_moves_bytes_to_the_host(reference):
    ref_report, ref_loss, ref_grads = reference
    device = {}
    # always_copy: copy to (other) host memory even on the CPU, so the device path runs: the storage
    # goes out as bytes and comes back as the same view (offset, strides) of a fresh storage.
    cases = ((["attention"], False), (["layer"], False), (["language_model.layers.*.mlp"], False), (["layer"], True))
    for patterns, always_copy in cases:
        model = _model()
        offloaded = apply_activation_offload(model, patterns, plan=memory_plan(model), always_copy=always_copy)
        assert offloaded
        report, loss, grads = _step(model)
        assert abs(float(loss - ref_loss)) <= TOL and _max_diff(grads, ref_grads) <= TOL, (patterns, always_copy)
        assert report.device < ref_report.device and report.host > 0, patterns
        # What the offloaded modules keep on the device shrinks.
        for name in offloaded:
            layer = name if name in report.per_module else name.rsplit(".", 1)[0]
            assert report.per_module[layer].device < ref_report.per_module[layer].device, name
        device[patterns[0], always_copy] = report.device
    assert device["layer", False] < device["attention", False]
    assert device["layer", True] == device["layer", False]

    # Full recompute + offload of the layers: what the checkpoints keep (their inputs) goes too.
    full_only = _model()
    apply_recompute(full_only, "full", plan=memory_plan(full_only))
    model = _model()
    apply_recompute(model, "full", plan=memory_plan(model))
    apply_activation_offload(model, ["layer"], plan=memory_plan(model), always_copy=True)
    report, _, grads = _step(model)
    assert _max_diff(grads, ref_grads) <= TOL
    assert report.device < _step(full_only)[0].device and report.host > 0

    # Offloading inside a recomputed region would keep what the checkpoint drops: refused.
    model = _model()
    apply_recompute(model, "selective", plan=memory_plan(model))
    with pytest.raises(ConfigError, match=r"^memory.offload_activations: visual.blocks.0.attn lies inside"):
        apply_activation_offload(model, ["attention"], plan=memory_plan(model))
    with pytest.raises(ConfigError, match=r"^memory.offload_activations: 'qkv' names no module"):
        apply_activation_offload(_model(), ["qkv"], plan=memory_plan(model))


# --------------------------------------------------------------------------------------------------
# Optimizer offload
# --------------------------------------------------------------------------------------------------


def _groups(model: torch.nn.Module) -> list[dict]:
    """As ``training.optim.build_optimizer`` groups them: decay for matrices, none for 1-D tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def _train(model, optimizer, steps: int = 3) -> None:
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))  # lr changes per step
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("master_weights", [False, True])
def test_optimizer_offload_matches_adamw(master_weights):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref_model, model = _model(), _model()
    ref_opt = torch.optim.AdamW(_groups(ref_model), **kwargs)
    opt = OffloadedAdamW(_groups(model), master_weights=master_weights, **kwargs)
    _train(ref_model, ref_opt)
    _train(model, opt)
    ref_params = dict(ref_model.named_parameters())
    worst = max(float((p - ref_params[n]).detach().abs().max()) for n, p in model.named_parameters())
    print(f"master_weights={master_weights}: max |param - AdamW param| = {worst:.1e}")
    assert worst <= TOL
    moments = 2 * sum(p.numel() * 4 for p in model.parameters())
    assert optimizer_state_bytes(ref_opt).device >= moments
    assert optimizer_state_bytes(opt).device == 0 and optimizer_state_bytes(opt).host >= moments

    # Its state dict round-trips: a fresh optimizer loaded from it takes the same next step.
    state = opt.state_dict()
    assert state["state"][0]["exp_avg"].shape == next(model.parameters()).shape
    twin_model = _model()
    twin_model.load_state_dict(model.state_dict())
    twin = OffloadedAdamW(_groups(twin_model), master_weights=master_weights, **kwargs)
    twin.load_state_dict(state)
    for m, o in ((model, opt), (twin_model, twin)):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.01)
        o.step()
    twin_params = dict(twin_model.named_parameters())
    assert all(torch.equal(p, twin_params[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------------
# Adaptive recompute
# --------------------------------------------------------------------------------------------------


def test_adaptive_recompute_fits_the_budget(reference):
    ref_report, _, ref_grads = reference
    plan = memory_plan(_model())
    # Ample budget: nothing to do.
    assert plan_adaptive(ref_report, plan, ref_report.device).recompute == []
    for fraction in (0.9, 0.6):
        budget = int(ref_report.device * fraction)
        choice = plan_adaptive(ref_report, plan, budget)
        assert choice.recompute and not choice.offload and choice.estimated_bytes <= budget
        model = _model()
        apply_adaptive(model, memory_plan(model), choice)
        report, _, grads = _step(model)
        assert _max_diff(grads, ref_grads) <= TOL
        assert report.device <= budget, (fraction, report.device, budget)
    # The greedy choice recomputes only what is needed: a tighter budget takes more layers.
    loose = plan_adaptive(ref_report, plan, int(ref_report.device * 0.9)).recompute
    tight = plan_adaptive(ref_report, plan, int(ref_report.device * 0.6)).recompute
    assert set(loose) < set(tight)

    # Beyond what full recompute of every layer can reach: one clear line ...
    all_inputs = sum(b.inputs for b in ref_report.per_module.values())
    budget = ref_report.unattributed.device + all_inputs // 2
    with pytest.raises(ConfigError) as info:
        plan_adaptive(ref_report, plan, budget)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("memory.budget_gb=") and "even full recompute of every layer keeps" in message
    # ... unless the recomputed layers' inputs may go to the host too.
    choice = plan_adaptive(ref_report, plan, budget, allow_offload=True)
    assert choice.recompute == plan.layer_names() and choice.offload
    model = _model()
    apply_adaptive(model, memory_plan(model), choice)
    report, _, grads = _step(model)
    assert _max_diff(grads, ref_grads) <= TOL
    assert report.device <= budget and report.host > 0
    with pytest.raises(ConfigError, match=r"^memory.budget_gb=.* even full recompute and offload of every layer"):
        plan_adaptive(ref_report, plan, ref_report.unattributed.device // 2, allow_offload=True)


# --------------------------------------------------------------------------------------------------
# FSDP2: recompute before (the parallel plan) and after (the adaptive mode) fully_shard; tensor parallel
# --------------------------------------------------------------------------------------------------


def _fsdp_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.fsdp import apply_fsdp
    from openspeed.distributed.mesh import build_mesh
    from openspeed.models.init import copy_full_into
    from openspeed.models.qwen2_5_vl import reset_non_persistent_buffers

    dims = build_mesh({"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 1}, "cpu")
    # Each rank takes one sample; the loss is normalised by the global token count, so the summed
    # gradients are those of the two-sample batch.
    batch = make_batch(IMAGE_BATCH[rank : rank + 1], seed=1)
    n_patches = int(BATCH["image_grid_thw"][:1].prod(-1).sum())
    batch["pixel_values"] = BATCH["pixel_values"][:n_patches] if rank == 0 else BATCH["pixel_values"][n_patches:]
    length = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        batch[key] = BATCH[key][rank : rank + 1, :length]

    ref = _model()
    ref(**BATCH, num_items_in_batch=NUM_ITEMS).loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    diffs = {}
    for when in ("before", "after"):
        with torch.device("meta"):
            model = Qwen2_5_VLModel(_config())
        plan = memory_plan(model)
        blocks = [model.get_submodule(name) for name in plan.layer_names()]
        if when == "before":
            apply_recompute(model, "selective", plan=plan)
        apply_fsdp(model, dims.dp_mesh(), blocks)
        if when == "after":
            apply_recompute(model, "full", plan=plan)
        model.to_empty(device="cpu")
        reset_non_persistent_buffers(model)
        for name, param in model.named_parameters():
            copy_full_into(param, WEIGHTS[name])
        report, out = measure_layers(model, plan, lambda m=model: m(**batch, num_items_in_batch=NUM_ITEMS))
        out.loss.backward()
        # The ranks saw different samples; the adaptive mode plans from their element-wise maximum.
        both = [None, None]
        torch.distributed.all_gather_object(both, report)
        agreed = max_over_ranks(report)
        assert agreed.device == max(r.device for r in both) > 0
        for name in plan.layer_names():
            assert agreed.per_module[name].device == max(r.per_module[name].device for r in both)
        worst = 0.0
        for name, param in model.named_parameters():
            assert isinstance(param.grad, DTensor), name
            worst = max(worst, float((param.grad.full_tensor() - ref_grads[name]).abs().max()))
        diffs[when] = worst
        if when == "after":
            # Optimizer offload over the FSDP2-sharded (DTensor) parameters equals AdamW's step.
            ref_model = _model()
            for name, param in ref_model.named_parameters():
                param.grad = model.get_parameter(name).grad.full_tensor()
            torch.optim.AdamW(_groups(ref_model), lr=1e-2).step()
            OffloadedAdamW(_groups(model), lr=1e-2).step()
            ref_params = dict(ref_model.named_parameters())
            diffs["adamw"] = max(
                float((p.full_tensor() - ref_params[n]).detach().abs().max()) for n, p in model.named_parameters()
            )

    # Tensor + sequence parallel (tp=2, the whole batch on both ranks): norm recompute, and offload
    # of the attention and MLP blocks, whose saved tensors include DTensors (always_copy: the copy path).
    from openspeed.distributed.tensor_parallel import loss_context
    from openspeed.models.qwen2_5_vl.parallelize import apply_tensor_parallel

    tp_dims = build_mesh({"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}, "cpu")
    with torch.device("meta"):
        model = Qwen2_5_VLModel(_config())
    apply_tensor_parallel(model, tp_dims.mesh["tp"], sequence_parallel=True)
    plan = memory_plan(model)
    apply_recompute(model, "norm", plan=plan)
    apply_activation_offload(model, ["attention", "mlp"], plan=plan, always_copy=True)
    model.to_empty(device="cpu")
    reset_non_persistent_buffers(model)
    for name, param in model.named_parameters():
        copy_full_into(param, WEIGHTS[name])
    with loss_context(model):
        with SavedBytesMeter(device="cpu") as meter:
            out = model(**BATCH, num_items_in_batch=NUM_ITEMS)
        out.loss.backward()
    assert meter.report.host > 0
    diffs["tp"] = max(
        float((p.grad.full_tensor() - ref_grads[n]).abs().max()) for n, p in model.named_parameters()
    )
    if rank == 0:
        with open(os.path.join(out_dir, "diffs.json"), "w", encoding="utf-8") as fh:
            json.dump(diffs, fh)


def test_savers_compose_with_fsdp2_and_tensor_parallel(tmp_path):
    run_workers(_fsdp_worker, 2, str(tmp_path))
    with open(tmp_path / "diffs.json", encoding="utf-8") as fh:
        diffs = json.load(fh)
    print(diffs)
    # Two ranks sum their halves of the batch: only the summation order differs from one process.
    assert max(diffs.values()) <= 1e-5, diffs
