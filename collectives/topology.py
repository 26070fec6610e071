"""Which rank sits on which node, and the process groups of the two-level hierarchy.

A topology is the (node rank, local rank) of every global rank. It comes from an explicit spec (tests, simulation:
`Topology.from_spec(nodes=2, per_node=2, rank=r)`) or from the Ray Train context (`Topology.from_ray_train()`:
each worker knows only its own node/local rank, so the pairs are all-gathered over the default group).

Groups: one per node (its local ranks, ordered by local rank) and one per local rank across nodes (the peers of
the sharded inter-node step, ordered by node rank). `torch.distributed.new_group` is collective over the whole
world, so every rank creates all of them in the same order and keeps the two it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    node_of: tuple[int, ...]
    """Node rank of each global rank."""
    local_of: tuple[int, ...]
    """Local rank (index inside its node) of each global rank."""
    rank: int
    """This process's global rank."""

    def __post_init__(self) -> None:
        if len(self.node_of) != len(self.local_of) or not self.node_of:
            raise ValueError(f"node_of and local_of must be non-empty and of equal length, got {self}")
        if not 0 <= self.rank < len(self.node_of):
            raise ValueError(f"rank must be in [0, {len(self.node_of)}), got {self.rank}")
        nodes = sorted(set(self.node_of))
        if nodes != list(range(len(nodes))):
            raise ValueError(f"node ranks must be 0..N-1, got {nodes}")
        per_node = len(self.node_of) // len(nodes)
        for node in nodes:
            locals_ = sorted(lr for n, lr in zip(self.node_of, self.local_of, strict=True) if n == node)
            if locals_ != list(range(per_node)):
                raise ValueError(
                    f"every node must hold local ranks 0..{per_node - 1} (same number of ranks per node), "
                    f"node {node} holds {locals_}"
                )

    @classmethod
    def from_spec(cls, *, nodes: int, per_node: int, rank: int) -> Topology:
        """Ranks placed node by node: rank r is on node r // per_node with local rank r % per_node."""
        if nodes < 1 or per_node < 1:
            raise ValueError(f"nodes and per_node must be >= 1, got {nodes} and {per_node}")
        world = nodes * per_node
        return cls(
            node_of=tuple(r // per_node for r in range(world)),
            local_of=tuple(r % per_node for r in range(world)),
            rank=rank,
        )

    @classmethod
    def from_world(cls, *, world_size: int, per_node: int, rank: int) -> Topology:
        """`from_spec` for a world of `world_size` ranks, `per_node` on each node."""
        if per_node < 1 or world_size % per_node:
            raise ValueError(
                f"world size must be divisible by the node size, got world size {world_size} and "
                f"{per_node} ranks per node"
            )
        return cls.from_spec(nodes=world_size // per_node, per_node=per_node, rank=rank)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]], rank: int) -> Topology:
        """From the (node rank, local rank) of every global rank."""
        return cls(node_of=tuple(p[0] for p in pairs), local_of=tuple(p[1] for p in pairs), rank=rank)

    @classmethod
    def from_ray_train(cls, context=None) -> Topology:
        """From Ray Train's context (`get_node_rank`, `get_local_rank`, `get_world_rank`); the pairs of all
        workers are all-gathered over the default process group, which Ray Train has initialised."""
        if context is None:
            import ray.train

            context = ray.train.get_context()
        mine = (context.get_node_rank(), context.get_local_rank())
        pairs: list = [None] * context.get_world_size()
        dist.all_gather_object(pairs, mine)
        return cls.from_pairs(pairs, context.get_world_rank())

    @property
    def world_size(self) -> int:
        return len(self.node_of)

    @property
    def nodes(self) -> int:
        return max(self.node_of) + 1

    @property
    def per_node(self) -> int:
        return self.world_size // self.nodes

    @property
    def node_rank(self) -> int:
        return self.node_of[self.rank]

    @property
    def local_rank(self) -> int:
        return self.local_of[self.rank]

    def node_ranks(self, node: int) -> list[int]:
        """Global ranks on `node`, ordered by local rank."""
        return sorted(
            (r for r in range(self.world_size) if self.node_of[r] == node), key=self.local_of.__getitem__
        )

    def peer_ranks(self, local_rank: int) -> list[int]:
        """Global ranks with `local_rank`, one per node, ordered by node rank."""
        return sorted(
            (r for r in range(self.world_size) if self.local_of[r] == local_rank),
            key=self.node_of.__getitem__,
        )

    def build_groups(self, backend: str | None = None) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """Creates every node group then every peer group (same order on all ranks: collective); returns this
        rank's (node group, peer group). Needs an initialised default process group."""
        assert dist.is_initialized() and dist.get_world_size() == self.world_size, (
            "init torch.distributed first"
        )
        node_group = peer_group = None
        for node in range(self.nodes):
            ranks = self.node_ranks(node)
            group = dist.new_group(ranks, backend=backend, sort_ranks=False)
            if node == self.node_rank:
                node_group = group
        for local in range(self.per_node):
            ranks = self.peer_ranks(local)
            group = dist.new_group(ranks, backend=backend, sort_ranks=False)
            if local == self.local_rank:
                peer_group = group
        return node_group, peer_group
