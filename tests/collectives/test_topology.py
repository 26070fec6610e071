"""Topology: rank placement, group membership, bad placements."""

from __future__ import annotations

import pytest

from collectives.topology import Topology


def test_spec_places_ranks_node_by_node():
    topo = Topology.from_spec(nodes=2, per_node=3, rank=4)
    assert (topo.world_size, topo.nodes, topo.per_node) == (6, 2, 3)
    assert (topo.node_rank, topo.local_rank) == (1, 1)
    assert [topo.node_ranks(n) for n in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert [topo.peer_ranks(lr) for lr in range(3)] == [[0, 3], [1, 4], [2, 5]]


def test_pairs_from_an_interleaved_placement():
    # Ray Train may interleave nodes; groups follow the pairs, ordered by local rank / node rank.
    pairs = [(0, 0), (1, 0), (0, 1), (1, 1)]
    topo = Topology.from_pairs(pairs, rank=3)
    assert (topo.node_rank, topo.local_rank) == (1, 1)
    assert topo.node_ranks(0) == [0, 2] and topo.node_ranks(1) == [1, 3]
    assert topo.peer_ranks(0) == [0, 1] and topo.peer_ranks(1) == [2, 3]


def test_world_not_divisible_by_node_size_raises():
    with pytest.raises(ValueError, match="world size must be divisible by the node size"):
        Topology.from_world(world_size=6, per_node=4, rank=0)


@pytest.mark.parametrize(
    "pairs",
    [
        [(0, 0), (0, 1), (1, 0)],  # uneven nodes
        [(0, 0), (0, 0)],  # duplicate local rank
        [(0, 0), (2, 0)],  # node ranks not 0..N-1
    ],
)
def test_bad_placements_raise(pairs):
    with pytest.raises(ValueError):
        Topology.from_pairs(pairs, rank=0)


def test_rank_out_of_range_raises():
    with pytest.raises(ValueError, match="rank must be in"):
        Topology.from_spec(nodes=2, per_node=2, rank=4)
