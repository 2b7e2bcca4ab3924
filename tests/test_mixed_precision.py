"""bf16 under FSDP2: parameters all-gathered in bf16, fp32 master weights, fp32 gradient reduction.

Two gloo ranks (dp_shard=2), the tiny Qwen2.5-VL, one micro-batch each (an image row, a text-only
row), under bf16 autocast as ``train.precision=bf16`` runs it. ``apply_fsdp(precision="bf16")``
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``) against the fp32-gathered path
(``precision="fp32"``, the same autocast): the loss and every gradient agree within bf16 tolerance,
the blocks really compute with bf16 weights, and the sharded parameters and their gradients stay fp32.
"""

from __future__ import annotations

import json

import torch
from _spawn import run_workers

BATCHES = [
    [[("text", 5), ("image", [1, 8, 8]), ("answer", 6)], [("text", 3), ("answer", 4)]],
    [[("text", 4), ("answer", 5)], [("text", 2), ("image", [1, 4, 8]), ("answer", 3)]],
]


def _step(precision: str, rank: int) -> dict:
    from _qwen_tiny import make_batch, native_config
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from openspeed.distributed.fsdp import apply_fsdp
    from openspeed.models.registry import get_model_spec

    spec = get_model_spec("qwen2_5_vl")
    torch.manual_seed(0)
    model = spec.build(native_config())
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.1)
    spec.reset_buffers(model)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    blocks = [*model.visual.blocks, *model.language_model.layers]
    apply_fsdp(model, mesh, blocks, precision=precision)
    seen: list[torch.dtype] = []
    blocks[-1].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**make_batch(BATCHES[rank], seed=rank)).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) and param.dtype == torch.float32  # fp32 master shards
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        grads[name] = param.grad.full_tensor().float()
    total = torch.tensor([float(loss.detach())])
    torch.distributed.all_reduce(total)
    return {"loss": float(total), "grads": grads, "gathered_dtype": str(seen[0])}


def _worker(rank: int, out_dir: str) -> None:
    mixed, plain = _step("bf16", rank), _step("fp32", rank)
    if rank == 0:
        torch.save({"mixed": mixed, "plain": plain}, f"{out_dir}/result.pt")


def test_bf16_mixed_precision_equals_the_fp32_gathered_path(tmp_path):
    run_workers(_worker, 2, str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    mixed, plain = result["mixed"], result["plain"]
    assert mixed["gathered_dtype"] == "torch.bfloat16" and plain["gathered_dtype"] == "torch.float32"
    assert abs(mixed["loss"] - plain["loss"]) <= 1e-2 * abs(plain["loss"])
    worst = {}
    for name, grad in plain["grads"].items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        worst[name] = float((mixed["grads"][name] - grad).abs().max()) / scale
    # bf16 keeps 8 bits of mantissa: a few roundings of weights and activations, not a wrong scale.
    print(json.dumps({"loss": [mixed["loss"], plain["loss"]], "worst_grad_rel": max(worst.values())}))
    assert max(worst.values()) < 0.1, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    norm_mixed = torch.sqrt(sum(g.pow(2).sum() for g in mixed["grads"].values()))
    norm_plain = torch.sqrt(sum(g.pow(2).sum() for g in plain["grads"].values()))
    assert abs(float(norm_mixed) - float(norm_plain)) <= 2e-2 * float(norm_plain)
