"""On the accelerator (``gpu`` tests: deselected where the accelerator is the CPU; run by
``benchmarks/gpu_check.sh``): the process group, collectives, FSDP2 mixed precision and compile.

* ``init_distributed`` builds ``cpu:gloo,cuda:nccl`` (``npu:hccl``): device tensors reduce on the
  device backend, CPU tensors and Python objects over gloo; counts come back exact past 2^24 as int64,
  a float64 is refused before it reaches the device backend.
* FSDP2 under ``precision="bf16"``: blocks compute with bf16 weights, the shards and their gradients
  stay fp32, and the loss and gradients agree with the fp32-gathered path within bf16 tolerance.
* ``train.compile`` with inductor on the device: the eager loss and gradients within 1e-3 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu

BATCH = [[("text", 5), ("image", [1, 8, 8]), ("answer", 6)], [("text", 3), ("answer", 4)]]


@pytest.fixture(scope="module")
def group():
    import torch.distributed as dist

    from openspeed.accelerator import get_accelerator, init_distributed, process_group_backend
    from openspeed.distributed.comm import destroy_distributed

    acc = get_accelerator()
    assert acc.device_type != "cpu"
    fresh = not dist.is_initialized()
    init_distributed()
    assert process_group_backend(acc.device_type) == f"cpu:gloo,{acc.device_type}:{acc.backend}"
    yield acc
    if fresh:
        destroy_distributed()


def _tiny_qwen(device):
    from _qwen_tiny import native_config

    from openspeed.models.registry import get_model_spec

    spec = get_model_spec("qwen2_5_vl")
    torch.manual_seed(0)
    model = spec.build(native_config())
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.1)
    model = model.to(device)
    spec.reset_buffers(model, device)
    return spec, model


def _batch(device):
    from _qwen_tiny import make_batch

    from openspeed.tasks.vlm_sft import VLMTask

    return VLMTask.to_device(make_batch(BATCH), device)


def test_collectives_run_on_the_device_and_over_gloo(group):
    from openspeed.distributed import comm

    assert comm.comm_device().type == group.device_type
    big = 2**24 + 1  # not representable in fp32
    assert comm.sum_counts(big, 3) == [big, 3]
    assert comm.max_counts([5, big]) == [5, big]
    assert comm.any_rank(True) and not comm.any_rank(False)
    x = torch.ones(4, device=group.device)
    assert comm.all_reduce(x).device.type == group.device_type
    with pytest.raises((TypeError, ValueError)):
        comm.all_reduce(torch.ones(2, dtype=torch.float64, device=group.device))
    assert comm.broadcast_object({"a": 1}) == {"a": 1}  # over gloo
    assert comm.all_gather_objects("x") == ["x"]
    comm.barrier()


def test_fsdp_bf16_mixed_precision(group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.fsdp import apply_fsdp

    results = {}
    for precision in ("bf16", "fp32"):
        spec, model = _tiny_qwen(group.device)
        mesh = init_device_mesh(group.device_type, (1,), mesh_dim_names=("dp_shard",))
        blocks = [*model.visual.blocks, *model.language_model.layers]
        apply_fsdp(model, mesh, blocks, precision=precision)
        seen = []
        blocks[-1].mlp.down_proj.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(m.weight.dtype))
        with group.autocast("bf16"):
            loss = model(**_batch(group.device)).loss
        loss.backward()
        grads = {}
        for name, param in model.named_parameters():
            assert isinstance(param, DTensor) and param.dtype == torch.float32
            assert param.grad is not None and param.grad.dtype == torch.float32
            grads[name] = param.grad.full_tensor().float()
        results[precision] = (float(loss.detach()), grads, seen[0])
    (loss_mp, grads_mp, dtype_mp), (loss_fp, grads_fp, dtype_fp) = results["bf16"], results["fp32"]
    assert dtype_mp == torch.bfloat16 and dtype_fp == torch.float32
    assert abs(loss_mp - loss_fp) <= 1e-2 * abs(loss_fp)
    for name, grad in grads_fp.items():
        assert float((grads_mp[name] - grad).abs().max()) <= 0.1 * float(grad.abs().max()), name


def test_inductor_compiled_blocks_equal_eager(group):
    from openspeed.training.compile import compile_blocks

    spec, eager = _tiny_qwen(group.device)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, spec, "inductor")
    batch = _batch(group.device)
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    for name, grad in grads[0].items():
        assert float((grads[1][name] - grad).abs().max()) <= 1e-3 * float(grad.abs().max()) + 1e-6, name


def test_mfu_divides_by_the_vendor_peak(group):
    from openspeed.accelerator import vendor_peak_flops

    name = group.device_name()
    listed = vendor_peak_flops(name, torch.bfloat16)
    if listed is None:
        pytest.skip(f"{name} is not in the vendor peak table (MFU uses the measured matmul peak)")
    assert group.peak_flops(torch.bfloat16) == listed and group.peak_source(torch.bfloat16) == "vendor peak"
