"""Hierarchical allreduce on 4 gloo ranks as 2 nodes x 2 (one spawn, many checks).

Structure (bytes and calls per level) is checked against the schedule formulas; values against a flat allreduce.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import run_ranks

from collectives.hierarchical import HierarchicalAllreduce
from collectives.internode import LowRank, NoCompression, TwoBitEF
from collectives.topology import Topology
from collectives.transport import TorchDistTransport
from kernels import codec2bit

N_VALUES = 10_000  # not a multiple of anything: exercises the padding
STEPS = 30


class _FakeRayContext:
    """Ray Train context of an interleaved placement: rank r on node r % 2, local rank r // 2."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def get_node_rank(self):
        return self.rank % 2

    def get_local_rank(self):
        return self.rank // 2

    def get_world_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world


def _build(topo: Topology, codec):
    node_group, peer_group = topo.build_groups()
    return HierarchicalAllreduce(TorchDistTransport(node_group), TorchDistTransport(peer_group), codec)


def _grad(rank: int, step: int) -> torch.Tensor:
    """A persistent direction (what training follows), a per-step part shared by all ranks, per-rank noise."""
    base = torch.randn(N_VALUES, generator=torch.Generator().manual_seed(999))
    shared = torch.randn(N_VALUES, generator=torch.Generator().manual_seed(1000 + step))
    noise = torch.randn(N_VALUES, generator=torch.Generator().manual_seed(rank * 7919 + step))
    return base + 0.5 * shared + 0.5 * noise


def _track(h: HierarchicalAllreduce, rank: int, reset_residuals: bool = False) -> dict:
    """STEPS steps of averaged allreduce: the applied updates and the exact averages, (STEPS, n) each."""
    applied, true = [], []
    for step in range(STEPS):
        g = _grad(rank, step)
        exact = g.clone()
        dist.all_reduce(exact)
        applied.append(h.allreduce_(g.clone(), key="bucket0", average=True))
        true.append(exact / dist.get_world_size())
        if reset_residuals:
            h.reducer.state.clear()
    return {"applied": torch.stack(applied), "true": torch.stack(true)}


def _drift(track: dict) -> torch.Tensor:
    """(STEPS,) norm of accumulated applied minus accumulated true update after each step."""
    return (track["applied"].double().cumsum(0) - track["true"].double().cumsum(0)).norm(dim=1)


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    topo = Topology.from_spec(nodes=2, per_node=2, rank=rank)
    flat = TorchDistTransport()

    # Exact hierarchical == flat allreduce: bit-exact on integer-valued data, close on random data.
    h = _build(topo, NoCompression())
    x = torch.randint(-1000, 1000, (N_VALUES,), generator=torch.Generator().manual_seed(rank)).float()
    out["exact_int"] = (h.allreduce_(x.clone(), "a"), flat.all_reduce_(x.clone()))
    x = torch.randn(N_VALUES, generator=torch.Generator().manual_seed(10 + rank))
    out["exact_float"] = (h.allreduce_(x.clone(), "b"), flat.all_reduce_(x.clone()))

    # Same, with the placement read from a (fake, interleaved) Ray Train context.
    h_ray = _build(Topology.from_ray_train(_FakeRayContext(rank, world)), NoCompression())
    out["ray_topology"] = (h_ray.allreduce_(x.clone(), "b"), flat.all_reduce_(x.clone()))

    # Bytes and calls per level for one compressed allreduce and one exact one.
    for name, codec in (("twobit", TwoBitEF(compiled=False)), ("exact", NoCompression())):
        hh = _build(topo, codec)
        before = (hh.intra.traffic.snapshot(), hh.inter.traffic.snapshot())
        hh.allreduce_(torch.randn(N_VALUES), "c")
        after = (hh.intra.traffic.snapshot(), hh.inter.traffic.snapshot())
        out[f"traffic_{name}"] = {
            "intra": tuple(a - b for a, b in zip(after[0], before[0], strict=True)),
            "inter": tuple(a - b for a, b in zip(after[1], before[1], strict=True)),
            "padded": hh.padded_numel(N_VALUES),
        }

    # Compressed: error feedback on, and (as a control) residuals dropped every step.
    out["twobit"] = _track(_build(topo, TwoBitEF(compiled=False)), rank)
    out["twobit_no_ef"] = _track(_build(topo, TwoBitEF(compiled=False)), rank, reset_residuals=True)
    out["lowrank"] = _track(_build(topo, LowRank(rank=4)), rank)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 4, tmp_path_factory.mktemp("hier"))


pytestmark = pytest.mark.timeout(240)


def test_uncompressed_equals_flat_allreduce(results):
    for r in results:
        hier, flat = r["exact_int"]
        assert torch.equal(hier, flat)
        hier, flat = r["exact_float"]
        torch.testing.assert_close(hier, flat, rtol=1e-6, atol=1e-5)


def test_topology_from_ray_train_context(results):
    for r in results:
        hier, flat = r["ray_topology"]
        torch.testing.assert_close(hier, flat, rtol=1e-6, atol=1e-5)


def test_bytes_and_calls_per_level(results):
    # 2 x 2: padded buffer P values, shard s = P / 2, each peer reduces c = s / 2.
    t = results[0]["traffic_twobit"]
    p = t["padded"]
    assert p % (2 * 2 * codec2bit.DEFAULT_BLOCK) == 0 and p >= N_VALUES
    s = p // 2
    payload = codec2bit.payload_nbytes(s // 2)
    assert t["intra"] == (2 * (p * 4) // 2, 2)  # reduce-scatter + all-gather, (L-1)/L of P fp32 each
    assert t["inter"] == (2 * payload, 2)  # all_to_all + all_gather, (N-1)/N of N payloads each
    e = results[0]["traffic_exact"]
    assert e["inter"] == (2 * (e["padded"] // 2) * 4 // 2, 1)  # one fp32 all-reduce of the shard
    assert e["inter"][0] / t["inter"][0] >= 15  # 93.75% less inter-node traffic, scales counted


@pytest.mark.parametrize("name", ["twobit", "lowrank"])
def test_compressed_ranks_end_identical(results, name):
    for r in results[1:]:
        assert torch.equal(r[name]["applied"], results[0][name]["applied"])


def test_error_feedback_tracks_the_true_gradient_sum(results):
    # With EF the accumulated error is what the residuals hold now: it plateaus. Without, it random-walks.
    r = results[0]
    drift, drift_no_ef = _drift(r["twobit"]), _drift(r["twobit_no_ef"])
    true_norm = r["twobit"]["true"].double().sum(0).norm()
    assert drift[-1] < 0.1 * true_norm
    assert drift[-1] < 0.5 * drift_no_ef[-1]
    assert drift[-1] < 1.5 * drift[STEPS // 3 - 1]  # no growth over the last two thirds
    assert drift_no_ef[-1] > 1.5 * drift_no_ef[STEPS // 3 - 1]  # the control does grow (~sqrt 3)


def test_low_rank_error_feedback_is_bounded(results):
    r = results[0]["lowrank"]
    drift = _drift(r)
    assert drift[-1] < 0.5 * r["true"].double().sum(0).norm()
    assert drift[-1] < 1.5 * drift[STEPS // 3 - 1]
