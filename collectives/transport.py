"""Communicator backends: the four collectives the hierarchical algorithm needs, over one group of ranks.

`Transport` fixes the interface and counts traffic (written once); a backend only moves bytes:
  - `TorchDistTransport`: a torch.distributed process group (gloo on CPU, NCCL on GPU).
  - `RayCollectiveTransport`: a `ray.util.collective` group (CuPy/NCCL communicators on GPU clusters, for workers
    that are plain Ray actors without torch.distributed).
`select_transport` picks one: torch.distributed when it is initialised (Ray Train always initialises it), else
ray.util.collective.

Counters are the bytes this rank sends under the usual bandwidth-optimal (ring / pairwise) schedules, so they are
exact functions of the message sizes and testable: all_reduce 2 (p-1)/p B, reduce_scatter and all_gather
(p-1)/p B of the full buffer B, all_to_all (p-1)/p B; and one message per collective call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(kw_only=True, slots=True)
class Traffic:
    bytes_sent: int = 0
    """Bytes this rank sent (schedule formula, see module docstring)."""
    calls: int = 0
    """Collective calls made on this group."""

    def snapshot(self) -> tuple[int, int]:
        return self.bytes_sent, self.calls


def _completed(t: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(t)
    return fut


class Transport(ABC):
    """One group of `size` ranks; this rank has index `rank` in it. Tensors are contiguous and 1-D."""

    def __init__(self, size: int, rank: int) -> None:
        self.size = size
        self.rank = rank
        self.traffic = Traffic()

    def _count(self, full_bytes: int, factor: int = 1) -> None:
        self.traffic.bytes_sent += factor * full_bytes * (self.size - 1) // self.size
        self.traffic.calls += 1

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place."""
        if self.size > 1:
            self._count(t.numel() * t.element_size(), factor=2)
            self._all_reduce_(t)
        return t

    def all_reduce_async_(self, t: torch.Tensor) -> torch.futures.Future:
        """`all_reduce_` that returns at once with a future of `t` (DDP overlaps it with the backward pass)."""
        if self.size == 1:
            return _completed(t)
        self._count(t.numel() * t.element_size(), factor=2)
        return self._all_reduce_async_(t)

    def _all_reduce_async_(self, t: torch.Tensor) -> torch.futures.Future:
        self._all_reduce_(t)  # backends without async collectives complete it here
        return _completed(t)

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (k,) = sum over the group of inp[rank * k : (rank + 1) * k]; inp is (size * k,)."""
        assert inp.numel() == out.numel() * self.size
        if self.size == 1:
            return out.copy_(inp)
        self._count(inp.numel() * inp.element_size())
        self._reduce_scatter(inp, out)
        return out

    def all_gather(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (size * k,) = the inp (k,) of every rank, in rank order."""
        assert out.numel() == inp.numel() * self.size
        if self.size == 1:
            return out.copy_(inp)
        self._count(out.numel() * out.element_size())
        self._all_gather(inp, out)
        return out

    def all_to_all(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Slice j of inp (size equal slices) goes to rank j; out slice j comes from rank j."""
        assert inp.numel() == out.numel() and inp.numel() % self.size == 0
        if self.size == 1:
            return out.copy_(inp)
        self._count(inp.numel() * inp.element_size())
        self._all_to_all(inp, out)
        return out

    @abstractmethod
    def _all_reduce_(self, t: torch.Tensor) -> None: ...

    @abstractmethod
    def _reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...

    @abstractmethod
    def _all_gather(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...

    @abstractmethod
    def _all_to_all(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...


# torch 2.13 renamed the tensor forms; keep older torch working.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchDistTransport(Transport):
    """A torch.distributed process group (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(dist.get_world_size(group), dist.get_rank(group))
        self.group = group

    def _all_reduce_(self, t):
        dist.all_reduce(t, group=self.group)

    def _all_reduce_async_(self, t):
        return dist.all_reduce(t, group=self.group, async_op=True).get_future().then(lambda _: t)

    def _reduce_scatter(self, inp, out):
        _reduce_scatter_single(out, inp, group=self.group)

    def _all_gather(self, inp, out):
        _all_gather_single(out, inp, group=self.group)

    def _all_to_all(self, inp, out):
        dist.all_to_all_single(out, inp, group=self.group)


class RayCollectiveTransport(Transport):
    """A `ray.util.collective` group (NCCL through CuPy on GPUs), already created with
    `ray.util.collective.init_collective_group(size, rank, backend, group_name)` in every member.

    ray.util.collective has no all_to_all: it is `size - 1` rounds of paired send/recv, the lower rank of each
    pair sending first, so blocking point-to-point calls cannot deadlock.
    """

    def __init__(self, group_name: str) -> None:
        from ray.util import collective

        self._col = collective
        self.group_name = group_name
        super().__init__(collective.get_collective_group_size(group_name), collective.get_rank(group_name))

    def _all_reduce_(self, t):
        self._col.allreduce(t, group_name=self.group_name)

    def _reduce_scatter(self, inp, out):
        self._col.reducescatter(out, list(inp.chunk(self.size)), group_name=self.group_name)

    def _all_gather(self, inp, out):
        self._col.allgather(list(out.chunk(self.size)), inp, group_name=self.group_name)

    def _all_to_all(self, inp, out):
        send, recv = inp.chunk(self.size), out.chunk(self.size)
        recv[self.rank].copy_(send[self.rank])
        for step in range(1, self.size):
            dst, src = (self.rank + step) % self.size, (self.rank - step) % self.size
            if self.rank < dst:
                self._col.send(send[dst], dst, group_name=self.group_name)
                self._col.recv(recv[src], src, group_name=self.group_name)
            else:
                self._col.recv(recv[src], src, group_name=self.group_name)
                self._col.send(send[dst], dst, group_name=self.group_name)


class SingleRank(Transport):
    """A group of one rank (a node with one worker, or one node): every collective is a copy."""

    def __init__(self) -> None:
        super().__init__(1, 0)

    def _unreachable(self, *tensors):
        raise AssertionError("a group of one never reaches the backend (Transport copies)")

    _all_reduce_ = _reduce_scatter = _all_gather = _all_to_all = _unreachable


def select_transport(group: dist.ProcessGroup | None = None, ray_group_name: str | None = None) -> Transport:
    """torch.distributed when it is initialised (gloo or NCCL, whichever the group uses), else the named
    ray.util.collective group."""
    if dist.is_initialized():
        return TorchDistTransport(group)
    if ray_group_name is None:
        raise ValueError("torch.distributed is not initialised: ray_group_name must name a collective group")
    return RayCollectiveTransport(ray_group_name)
