import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from actors.weight_store import SampleWeightStore, WeightRule, last_layer_grad_norm


def test_rule_exact_on_fixed_difficulties():
    store = SampleWeightStore(np.arange(100, 120), WeightRule())
    store.weights[:] = np.r_[np.full(10, 1.0), np.full(5, 2.9), np.full(5, 0.51)]
    before = store.weights.copy()
    d = np.arange(20, dtype=np.float32)  # 90th percentile = 17.1 -> samples 18, 19 are hard
    store.record(np.arange(100, 120)[::-1], d[::-1])  # order of ids does not matter
    out = store.apply_rule()
    assert out["hard"] == 2 and out["updated"] == 20
    expected = np.maximum(0.5, before * 0.95)
    expected[18:] = np.minimum(3.0, before[18:] * 1.05)  # 0.51 * 1.05
    np.testing.assert_allclose(store.weights, expected)
    # caps and floors: a hard sample at 2.9 goes to 3.0, not 3.045; an easy one at 0.51 to 0.5
    store2 = SampleWeightStore(np.arange(3), WeightRule(percentile=50))
    store2.weights[:] = [2.9, 0.51, 1.0]
    store2.record([0, 1, 2], [5.0, 0.0, 0.1])
    store2.apply_rule()
    np.testing.assert_allclose(store2.weights, [3.0, 0.5, 0.95])


def test_unrecorded_samples_keep_weight_and_every_k_steps():
    store = SampleWeightStore(np.arange(10), WeightRule(every_steps=4))
    store.record([0, 1, 2], [1.0, 2.0, 3.0], steps=2)
    assert store.updates == 0
    store.record([3], [4.0], steps=2)
    assert store.updates == 1
    assert np.all(store.weights[4:] == 1.0) and np.all(store.weights[:4] != 1.0)


def test_draw_frequencies_proportional_to_weights():
    """Chi-square goodness of fit of the per-epoch draw against w / sum(w); false-alarm rate 0.1% per test."""
    n = 50
    store = SampleWeightStore(np.arange(n), seed=3)
    store.weights[:] = np.linspace(0.5, 3.0, n)
    counts = np.zeros(n)
    for epoch in range(40):
        store.epoch = epoch - 1 if epoch else -1  # skip the rule: nothing recorded anyway
        store.begin_epoch(epoch, epoch_size=500)
        counts += store.counts_for(np.arange(n))[0]
    expected = counts.sum() * store.weights / store.weights.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # and it is not uniform: uniform expectation is rejected
    assert stats.chisquare(counts, np.full(n, counts.sum() / n)).pvalue < 1e-6


def test_unbiased_scale():
    store = SampleWeightStore(np.arange(4))
    store.weights[:] = [0.5, 1.0, 1.5, 3.0]
    _, scale = store.counts_for([0, 3])
    np.testing.assert_allclose(scale, [1.5 / 0.5, 1.5 / 3.0], rtol=1e-6)
    # expectation of scale * indicator under p = w / sum(w) is 1 for every sample: E[1/(N p)] * N p = 1
    p = store.weights / store.weights.sum()
    _, all_scale = store.counts_for(np.arange(4))
    np.testing.assert_allclose(all_scale * p * 4, np.ones(4), rtol=1e-6)


def test_last_layer_grad_norm_is_exact():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    h = torch.randn(5, 6)
    y = torch.randint(0, 4, (5,))
    got = last_layer_grad_norm(head(h), y, h)
    for i in range(5):
        head.zero_grad()
        F.cross_entropy(head(h[i : i + 1]), y[i : i + 1]).backward()
        want = torch.sqrt(head.weight.grad.square().sum() + head.bias.grad.square().sum())
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_state_round_trip_and_snapshot_restart(tmp_path):
    path = str(tmp_path / "w.npz")
    store = SampleWeightStore(np.arange(1000, 0, -1), snapshot_path=path)
    store.begin_epoch(0)
    store.record(np.arange(1, 501), np.random.default_rng(0).random(500))
    store.begin_epoch(1)  # applies the rule, snapshots
    again = SampleWeightStore(np.arange(1, 1001), snapshot_path=path)  # a restarted actor
    np.testing.assert_array_equal(again.weights, store.weights)
    assert again.epoch == 1 and again.updates == 1
    np.testing.assert_array_equal(again.counts_for([5, 6])[0], store.counts_for([5, 6])[0])
    other = SampleWeightStore(np.arange(10))
    with pytest.raises(ValueError, match="different set of sample ids"):
        other.load_state(store.state())


def test_million_samples_is_fast():
    import time

    ids = np.arange(2_000_000)
    store = SampleWeightStore(ids)
    t0 = time.perf_counter()
    store.record(ids[::2], np.random.default_rng(0).random(1_000_000))
    store.begin_epoch(0)
    store.begin_epoch(1)
    assert time.perf_counter() - t0 < 10


def test_bad_inputs():
    with pytest.raises(ValueError, match="unique"):
        SampleWeightStore([1, 1, 2])
    store = SampleWeightStore([1, 2, 3])
    with pytest.raises(ValueError, match="unknown sample ids"):
        store.record([4], [1.0])
    with pytest.raises(ValueError, match="finite"):
        store.record([1], [float("nan")])
    with pytest.raises(ValueError, match="percentile"):
        WeightRule(percentile=100)
    with pytest.raises(ValueError, match="floor <= initial <= cap"):
        WeightRule(floor=2.0)


def test_snapshot_on_an_object_store_survives_a_restart(tmp_path):
    """A restarted actor on another node reads the snapshot from the run's storage (a real S3-compatible server)."""
    from models import storage
    from tests._moto import moto_server, patched_env

    with moto_server(bucket="tandem-ci") as env, patched_env(env):
        uri = "s3://tandem-ci/run-1/weight_store.npz"
        store = SampleWeightStore(np.arange(200), snapshot_path=uri)
        store.begin_epoch(0)
        store.record(np.arange(200), np.linspace(0, 1, 200, dtype=np.float32))
        store.begin_epoch(1)
        assert storage.exists(uri) and not list(tmp_path.iterdir())  # nothing local
        again = SampleWeightStore(np.arange(200), snapshot_path=uri)
        np.testing.assert_array_equal(again.weights, store.weights)
        assert again.updates == store.updates == 1 and not np.all(again.weights == 1.0)
