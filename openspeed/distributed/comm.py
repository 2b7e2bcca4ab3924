"""Every collective of the training loop, evaluation and the model plans, in one place.

The rules these wrappers keep, so the same code runs on gloo (CPU), NCCL (CUDA) and HCCL (Ascend):

* tensors live on the accelerator's device (NCCL and HCCL have no CPU tensors; on a CUDA / NPU run
  the process group also registers gloo, for DCP and object collectives, see
  :func:`openspeed.accelerator.process_group_backend`);
* counts travel as int64 (exact far past 2^24, where float32 stops counting tokens one by one);
* no float64 crosses a collective (HCCL has none): sums of losses travel as float32;
* several scalars share one collective, and reading them back is one host copy.

Context parallelism keeps its own byte-counting wrappers in
:mod:`openspeed.distributed.context_parallel.comm`; a repository rule fails a ``torch.distributed``
collective called anywhere but these two modules.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def comm_device() -> torch.device:
    """The device collective tensors are made on: the accelerator's (the CPU on a CPU run)."""
    from openspeed.accelerator import get_accelerator

    return get_accelerator().device


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (``op``: sum, max or min); returns it."""
    if tensor.dtype == torch.float64:
        raise TypeError("float64 cannot cross a collective (HCCL has none): reduce float32 or int64")
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def sum_counts(*counts: int, group: dist.ProcessGroup | None = None) -> list[int]:
    """Each integer count summed over ``group``: one int64 collective on the device, one host copy."""
    tensor = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=comm_device())
    return [int(v) for v in all_reduce(tensor, group=group).tolist()]


def max_counts(counts: Sequence[int], group: dist.ProcessGroup | None = None) -> list[int]:
    """The largest value of each count over ``group`` (one int64 collective)."""
    tensor = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=comm_device())
    return [int(v) for v in all_reduce(tensor, op="max", group=group).tolist()]


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True when ``flag`` holds on some rank of ``group``."""
    return max_counts([int(bool(flag))], group)[0] > 0


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``tensor`` of global rank ``src`` copied into ``tensor`` on every rank of ``group``; returns it."""
    if tensor.dtype == torch.float64:
        raise TypeError("float64 cannot cross a collective (HCCL has none)")
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def barrier(group: dist.ProcessGroup | None = None) -> None:
    dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """A picklable object of global rank ``src``, on every rank of ``group``."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in the group's rank order."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def destroy_distributed() -> None:
    """Tear the process groups down, every rank together (the partner of
    :func:`openspeed.accelerator.init_distributed`)."""
    if dist.is_initialized():
        # Leave together: a rank tearing down its gloo pairs while a peer is still finishing its
        # last collectives or point-to-point sends can abort that peer at exit.
        # Free what still holds communication work (pipeline schedules keep their async send/recv
        # handles in reference cycles) while the process groups are alive.
        gc.collect()
        try:
            barrier()
        except Exception:  # noqa: BLE001 - a peer already failed; its error is the one to report
            pass
        dist.destroy_process_group()


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the sum of every rank's gradient (each rank used the total)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_reduce(x.clone(), group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad.contiguous().clone(), group=ctx.group), None


def sum_over_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of every rank's ``x`` on every rank of ``group``, differentiable."""
    return _SumOverGroup.apply(x, group)


# --------------------------------------------------------------------------------------------------
# Tensors of shapes the receiver does not know (pipeline stages outside a schedule)
# --------------------------------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool]
_MAX_DIMS = 4


def _header(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Fixed-size int64 header: count, then (dtype code, ndim, dims padded to 4) per tensor."""
    row = [len(tensors)]
    for t in tensors:
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"cannot send a {t.dim()}-d tensor between stages")
        row += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *([0] * (_MAX_DIMS - t.dim()))]
    return torch.tensor(row, dtype=torch.int64, device=device)


def _header_size(n: int) -> int:
    return 1 + n * (2 + _MAX_DIMS)


def _empty_from_header(header: list[int], device: torch.device) -> list[torch.Tensor]:
    out = []
    for i in range(header[0]):
        code, ndim, *dims = header[1 + i * (2 + _MAX_DIMS) : 1 + (i + 1) * (2 + _MAX_DIMS)]
        out.append(torch.empty(dims[:ndim], dtype=_DTYPES[code], device=device))
    return out


def send_tensors(tensors: Sequence[torch.Tensor], dst: int, group, device: torch.device) -> None:
    """Send ``tensors`` (up to 4-d each) to global rank ``dst``, their shapes first."""
    header = _header(tensors, device)
    dist.send(torch.tensor([header.numel()], dtype=torch.int64, device=device), dst=dst, group=group)
    dist.send(header, dst=dst, group=group)
    for t in tensors:
        dist.send(t.contiguous(), dst=dst, group=group)


def recv_tensors(src: int, group, device: torch.device) -> list[torch.Tensor]:
    """What :func:`send_tensors` on global rank ``src`` sent here."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, group=group)
    header = torch.zeros(int(size), dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    tensors = _empty_from_header(header.tolist(), device)
    for t in tensors:
        dist.recv(t, src=src, group=group)
    return tensors


def broadcast_tensor(tensor: torch.Tensor | None, src: int, group, device: torch.device) -> torch.Tensor:
    """Global rank ``src``'s ``tensor`` (any shape up to 4-d; ``None`` on the other ranks) on every rank."""
    header = (_header([tensor], device) if tensor is not None
              else torch.zeros(_header_size(1), dtype=torch.int64, device=device))
    dist.broadcast(header, src=src, group=group)
    tensor = _empty_from_header(header.tolist(), device)[0] if tensor is None else tensor.contiguous()
    dist.broadcast(tensor, src=src, group=group)
    return tensor
