"""Hierarchical allreduce: exact inside a node, an inter-node codec between nodes, written once for any transport.

For a flat buffer g of n values on W = N nodes x L ranks per node (padded to a multiple of L * N * alignment):
  1. intra-node reduce-scatter (exact): local rank l gets shard l (n / L values) of its node's sum;
  2. inter-node: the L peer groups (same local rank, one per node) reduce their shards in parallel with the
     codec (collectives/internode.py), so every rank and every NIC path works at once;
  3. intra-node all-gather of the reduced shards.
Intra-node traffic per rank is 2 (L-1)/L n values, half of reduce + broadcast through a leader; inter-node traffic
per node does not grow with N (the codec's reduce-scatter + all-gather structure).
"""

from __future__ import annotations

import torch

from collectives.internode import InterNodeCodec, NoCompression
from collectives.transport import Transport


class HierarchicalAllreduce:
    """`allreduce_(flat, key)`: sum (or mean) over all ranks of a flat fp32 buffer, in place.

    `intra` spans this rank's node (its rank = local rank), `inter` this rank's peers (its rank = node rank).
    """

    def __init__(self, intra: Transport, inter: Transport, codec: InterNodeCodec | None = None) -> None:
        self.intra = intra
        self.inter = inter
        self.codec = codec if codec is not None else NoCompression()
        self.reducer = self.codec.build()
        self._scratch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def world_size(self) -> int:
        return self.intra.size * self.inter.size

    def padded_numel(self, numel: int) -> int:
        unit = self.intra.size * self.inter.size * self.codec.alignment
        return -(-numel // unit) * unit

    def _buffers(self, key: str, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded working buffer and shard, kept per key: a fresh 45 MB tensor per step costs page faults."""
        padded = self.padded_numel(n)
        bufs = self._scratch.get(key)
        if bufs is None or bufs[0].numel() != padded or bufs[0].device != device:
            buf = torch.empty(padded, dtype=torch.float32, device=device)
            bufs = self._scratch[key] = (buf, torch.empty(padded // self.intra.size, device=device))
        return bufs

    def allreduce_(self, flat: torch.Tensor, key: str, average: bool = False) -> torch.Tensor:
        """flat (n,) fp32 contiguous -> sum (mean with `average`) over all ranks, written into flat."""
        assert flat.dim() == 1 and flat.is_contiguous() and flat.dtype == torch.float32
        n = flat.numel()
        buf, shard = self._buffers(key, n, flat.device)
        if average:
            torch.div(flat, self.world_size, out=buf[:n])
        else:
            buf[:n] = flat
        buf[n:] = 0.0
        self.intra.reduce_scatter(buf, shard)  # (n / L,) exact node sum of shard l
        self.reducer.reduce_(shard, self.inter, key)  # sum over nodes
        self.intra.all_gather(shard, buf)
        flat.copy_(buf[:n])
        return flat

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.reducer.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.reducer.load_state_dict(sd)
