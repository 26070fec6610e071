"""Structure of the alpha-beta cost model (bench/scaling_model.py): closed forms, bytes per level, monotonicity."""

from __future__ import annotations

import pytest

from bench.scaling_model import (
    Case,
    Cluster,
    CodecSpeed,
    FlatRing,
    HierarchicalExact,
    HierarchicalTwoBit,
    LeaderTwoBit,
    NamespaceSetup,
    SeedAssumptions,
    Workload,
    efficiency,
    fit_loopback,
    namespace_cluster,
    predict,
    seed_cases,
    seed_claim,
    seed_sensitivity,
)
from kernels.codec2bit import payload_nbytes

CODEC = CodecSpeed(encode_melem_s=300.0, decode_melem_s=1500.0, block=512)


def cluster(
    nodes: int, per_node: int, inter_gbit_s: float = 100.0, intra_gbyte_s: float = 200.0, alpha: float = 1e-5
) -> Cluster:
    return Cluster(
        nodes=nodes,
        ranks_per_node=per_node,
        intra_gbyte_s=intra_gbyte_s,
        intra_latency_s=alpha,
        inter_gbit_s=inter_gbit_s,
        inter_latency_s=alpha,
    )


def workload(numel: int = 1 << 24, compute_s: float = 0.5) -> Workload:
    return Workload(numel=numel, compute_s=compute_s)


def test_flat_ring_closed_form_hand_computed():
    # 4 ranks on one node, 100 MB fp32, 10 GB/s, 1 ms per step: 2 (4-1) x (1 ms + 25 MB / 10 GB/s) = 21 ms
    cl = cluster(1, 4, intra_gbyte_s=10.0, alpha=1e-3)
    cost = FlatRing().cost(cl, Workload(numel=25_000_000, compute_s=1.0))
    assert cost.network_s == pytest.approx(0.021, rel=1e-12)
    assert cost.codec_s == 0.0 and cost.inter_bytes_per_node == 0
    # 2 nodes x 1 rank over 1 Gbit/s, 0.5 ms: 2 x (0.5 ms + 50 MB / 125 MB/s) = 0.801 s
    two = FlatRing().cost(cluster(2, 1, inter_gbit_s=1.0, alpha=5e-4), Workload(numel=25_000_000, compute_s=1.0))
    assert two.network_s == pytest.approx(0.801, rel=1e-12)


def test_hierarchical_exact_closed_form_hand_computed():
    # 2 nodes x 4 ranks, 100 MB fp32, 100 GB/s inside, 8 Gbit/s = 1 GB/s per node, no latency:
    # intra RS + AG 2 x 3 x 25 MB / 100 GB/s = 1.5 ms; 4 shard rings share the node link:
    # 2 x (2-1) x 4 x (25 MB / 2) / 1 GB/s = 100 ms
    cl = cluster(2, 4, inter_gbit_s=8.0, intra_gbyte_s=100.0, alpha=0.0)
    cost = HierarchicalExact().cost(cl, Workload(numel=25_000_000, compute_s=1.0))
    assert cost.network_s == pytest.approx(0.1015, rel=1e-12)


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (1, 8), (2, 2), (4, 8), (16, 8)])
def test_flat_ring_bytes_per_rank(nodes, per_node):
    wl = workload()
    w = nodes * per_node
    cost = FlatRing().cost(cluster(nodes, per_node), wl)
    assert cost.bytes_per_rank == pytest.approx(2 * (w - 1) / w * wl.nbytes, rel=1e-12)
    assert cost.steps == {"ring": 2 * (w - 1)}


@pytest.mark.parametrize("per_node", [1, 2, 4, 8])
def test_hierarchical_exact_equals_flat_on_one_node(per_node):
    cl, wl = cluster(1, per_node), workload()
    flat, hier = FlatRing().cost(cl, wl), HierarchicalExact().cost(cl, wl)
    assert hier.network_s == pytest.approx(flat.network_s, rel=1e-12)
    assert hier.bytes_per_rank == pytest.approx(flat.bytes_per_rank, rel=1e-12)
    two = HierarchicalTwoBit(codec=CODEC).cost(cl, wl)  # no inter-node step: nothing coded
    assert two.codec_s == 0.0 and two.network_s == pytest.approx(flat.network_s, rel=1e-12)


@pytest.mark.parametrize("nodes", [2, 4, 8, 16])
def test_two_bit_inter_node_bytes_are_a_sixteenth(nodes):
    cl, wl = cluster(nodes, 8), workload()
    exact = HierarchicalExact().cost(cl, wl)
    two = HierarchicalTwoBit(codec=CODEC).cost(cl, wl)
    ratio = exact.inter_bytes_per_node / two.inter_bytes_per_node
    assert ratio == pytest.approx(4 * 512 / (4 + 512 // 4), rel=1e-3)  # fp32 / (levels + codes): 15.52
    assert 15.0 < ratio < 16.0
    # exactly what TwoBitEFReducer sends: all_to_all + all_gather of one payload per peer, L peer groups per node
    c = wl.numel // 8 // nodes
    assert two.inter_bytes_per_node == 8 * 2 * (nodes - 1) * payload_nbytes(c, 512)
    assert exact.inter_bytes_per_node == pytest.approx(2 * (nodes - 1) / nodes * wl.nbytes)


def test_two_bit_inter_node_bytes_bounded_in_node_count():
    wl = workload()
    per_node = [HierarchicalTwoBit(codec=CODEC).cost(cluster(n, 8), wl).inter_bytes_per_node for n in (2, 4, 8, 16)]
    assert per_node == sorted(per_node)  # 2 (N-1) / N grows towards 2 ...
    assert per_node[-1] < 2 * wl.numel * (4 + 128) / 512  # ... and never passes 2 x the coded buffer


def test_steps_per_level():
    cost = HierarchicalTwoBit(codec=CODEC).cost(cluster(4, 8), workload())
    assert cost.steps == {"intra": 2 * 7, "inter": 2 * 3}
    assert HierarchicalExact().cost(cluster(4, 8), workload()).steps == {"intra": 14, "inter": 6}


def test_two_bit_codec_time():
    nodes, per_node, wl = 4, 8, workload()
    c = wl.numel // per_node // nodes
    cost = HierarchicalTwoBit(codec=CODEC).cost(cluster(nodes, per_node), wl)
    expected = nodes * c / 300e6 + (2 * nodes - 1) * c / 1500e6  # N chunks encoded, 2N-1 decoded
    assert cost.codec_s == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("variant", [FlatRing(), HierarchicalExact(), HierarchicalTwoBit(codec=CODEC)])
@pytest.mark.parametrize("overlap", [False, True])
def test_efficiency_monotone_in_bandwidth(variant, overlap):
    wl = workload(compute_s=0.05)
    effs = [efficiency(variant.cost(cluster(8, 8, inter_gbit_s=g), wl), wl, overlap) for g in (1, 10, 100, 1000)]
    assert all(0 < e <= 1 for e in effs)
    assert effs == sorted(effs)
    assert effs[0] < effs[-1]
    intra = [efficiency(variant.cost(cluster(8, 8, intra_gbyte_s=b), wl), wl, overlap) for b in (1, 10, 100)]
    assert intra == sorted(intra)


def test_overlap_never_hurts_and_codec_never_hides():
    wl = workload(compute_s=10.0)
    cost = HierarchicalTwoBit(codec=CODEC).cost(cluster(4, 8), wl)
    assert efficiency(cost, wl, overlap=True) >= efficiency(cost, wl, overlap=False)
    assert efficiency(cost, wl, overlap=True) == pytest.approx(10.0 / (10.0 + cost.codec_s))


def test_hierarchy_beats_flat_ring_at_two_nodes():
    # flat: each node boundary carries 2 (W-1)/W S; hierarchical: 2 (N-1)/N S (= S at N = 2)
    cl, wl = cluster(2, 8, inter_gbit_s=100.0), workload()
    assert HierarchicalExact().cost(cl, wl).inter_bytes_per_node == pytest.approx(wl.nbytes)
    assert FlatRing().cost(cl, wl).inter_bytes_per_node == pytest.approx(2 * 15 / 16 * wl.nbytes)


def test_fit_loopback_reproduces_the_anchor():
    ns = NamespaceSetup()
    bw = fit_loopback(ns, 11_172_810, 0.56)
    codec = CodecSpeed(encode_melem_s=ns.prototype_codec_melem_s, decode_melem_s=ns.prototype_codec_melem_s)
    t = LeaderTwoBit(codec=codec).cost(namespace_cluster(ns, 1.0, bw), Workload(numel=11_172_810, compute_s=1.0))
    assert t.total_s == pytest.approx(0.56, rel=1e-9)
    with pytest.raises(ValueError, match="below"):
        fit_loopback(ns, 11_172_810, 0.01)


def test_seed_cases_and_claim_keys():
    a = SeedAssumptions()
    assert a.compute_s == pytest.approx(6 * 7e9 * 16384 / 156e12)
    cases = seed_cases(a)
    preds = {c.name: predict(c) for c in cases}
    assert all(set(p) == {"2", "4", "8", "16"} for p in preds.values())
    sens = seed_sensitivity(a)
    claim = seed_claim(preds, sens)
    assert set(claim["model_16x8"]) == {c.name for c in cases}
    fp32 = [r for r in sens if r["grads"] == "fp32"]
    assert [r["eff flat"] for r in fp32] == sorted(r["eff flat"] for r in fp32)  # faster links never hurt
    bf16 = {r["node Gbit/s"]: r["eff flat"] for r in sens if r["grads"] == "bf16"}
    assert all(bf16[r["node Gbit/s"]] > r["eff flat"] for r in fp32)  # half the bytes
    assert claim["stated"]["scaling_factor"] == 0.89
    assert isinstance(cases[0], Case)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="nodes"):
        cluster(0, 8)
    with pytest.raises(ValueError, match="inter_gbit_s"):
        cluster(2, 8, inter_gbit_s=0.0)
    with pytest.raises(ValueError, match="bytes_per_value"):
        Workload(numel=10, bytes_per_value=3, compute_s=1.0)
    with pytest.raises(ValueError, match="codec"):
        CodecSpeed(encode_melem_s=0.0, decode_melem_s=1.0)
