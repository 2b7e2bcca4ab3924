"""The collectives context parallelism uses, each counting the bytes this rank sends.

Only three patterns are needed: an all-to-all of per-destination chunks (Ulysses), a send-to-next /
receive-from-previous exchange on a ring (ring attention), and an all-gather (masks, ``gather``).
They work on any backend with those primitives (gloo on CPU, nccl on GPU); uneven chunk sizes are fine.

Byte counting: every wrapper adds the bytes that leave this rank for another rank (an all-to-all chunk a
rank keeps for itself is not counted) to a module-level counter, read with ``comm_bytes`` and cleared
with ``reset_comm_bytes``. The benchmark compares these numbers with the theoretical volumes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_BYTES_SENT: dict[str, int] = {"all_to_all": 0, "p2p": 0, "all_gather": 0}


def reset_comm_bytes() -> None:
    """Set the sent-bytes counters of this process back to zero."""
    for key in _BYTES_SENT:
        _BYTES_SENT[key] = 0


def comm_bytes() -> dict[str, int]:
    """Bytes this process has sent to other ranks since the last reset, per collective and ``total``."""
    counts = dict(_BYTES_SENT)
    counts["total"] = sum(_BYTES_SENT.values())
    return counts


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all(
    chunks: list[torch.Tensor], recv_numels: list[int], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Send ``chunks[j]`` to group rank ``j``; return the flat chunks received from each rank, in rank order.

    Chunks may have any shape and uneven sizes (they travel flattened); ``recv_numels[i]`` is the element
    count that rank ``i`` sends here. All chunks share one dtype.
    """
    me = group.rank()
    send = torch.cat([c.reshape(-1) for c in chunks])
    recv = send.new_empty(sum(recv_numels))
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=list(recv_numels),
        input_split_sizes=[c.numel() for c in chunks],
        group=group,
    )
    _BYTES_SENT["all_to_all"] += sum(_nbytes(c) for j, c in enumerate(chunks) if j != me)
    return list(recv.split(list(recv_numels)))


class RingExchange:
    """One step of a ring: send a tensor to the next rank while receiving the previous rank's.

    ``start`` posts both transfers (``dist.batch_isend_irecv``) and returns at once, so the caller can
    compute while they run; ``wait`` returns the received tensor. Ranks are group ranks.
    """

    def __init__(self, group: dist.ProcessGroup, next_rank: int, prev_rank: int):
        self.group = group
        self.next_rank = next_rank
        self.prev_rank = prev_rank

    def start(self, tensor: torch.Tensor, tag: int) -> tuple[list, torch.Tensor, torch.Tensor]:
        tensor = tensor.contiguous()
        recv = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, group=self.group, group_peer=self.next_rank, tag=tag),
            dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev_rank, tag=tag),
        ]
        works = dist.batch_isend_irecv(ops)
        _BYTES_SENT["p2p"] += _nbytes(tensor)
        # The sent tensor is returned too: it must stay alive until the transfer is done.
        return works, tensor, recv

    @staticmethod
    def wait(pending: tuple[list, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        works, _, recv = pending
        for work in works:
            work.wait()
        return recv


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape on all ranks), in group rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x, group=group)
    _BYTES_SENT["all_gather"] += _nbytes(x) * (group.size() - 1)
    return parts
