"""The batching-server simulator: arrivals, service-time models, Serve's batch-forming rule, determinism."""

from __future__ import annotations

import math
import random

import pytest

from serve_app.batching import BatchingConfig, Static
from serve_app.simulator import (
    Constant,
    LinearServiceTime,
    Sine,
    Step,
    TableServiceTime,
    poisson_arrivals,
    simulate,
)

SERVICE = LinearServiceTime(fixed_s=0.010, per_item_s=0.0005, jitter=0.1)


def static(batch: int, wait_s: float) -> Static:
    return Static(BatchingConfig(initial_batch_size=batch, initial_wait_s=wait_s, max_wait_s=max(wait_s, 0.02)))


def test_poisson_count_matches_rate():
    arrivals = poisson_arrivals(Constant(1000.0), 20.0, random.Random(0))
    # Poisson(20000): 5 standard deviations is ~707
    assert abs(len(arrivals) - 20_000) < 5 * math.sqrt(20_000)
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 20.0


def test_sine_and_step_shape_the_arrivals():
    sine = poisson_arrivals(Sine(mean=1000.0, swing=0.5, period_s=10.0), 10.0, random.Random(1))
    high = sum(1 for t in sine if t < 5.0)  # expected 5000 * (1 + 1/pi) ~ 6592
    low = len(sine) - high  # ~ 3408
    assert high > 6300 and low < 3700
    step = poisson_arrivals(Step(before=100.0, after=1000.0, at_s=5.0), 10.0, random.Random(2))
    before = sum(1 for t in step if t < 5.0)
    assert 350 < before < 650 and 4500 < len(step) - before < 5500


def test_same_seed_same_result_and_seed_matters():
    pattern = Sine(mean=300.0)
    a = simulate(static(10, 0.01), pattern, SERVICE, duration_s=5.0, seed=7)
    b = simulate(static(10, 0.01), pattern, SERVICE, duration_s=5.0, seed=7)
    c = simulate(static(10, 0.01), pattern, SERVICE, duration_s=5.0, seed=8)
    assert a == b
    assert a.latencies_s != c.latencies_s


def test_sparse_arrivals_wait_then_run_alone():
    # 0.2 request/s, no jitter: every batch is a single request that waits the full timeout, then runs t(1).
    exact = LinearServiceTime(fixed_s=0.004, per_item_s=0.001, jitter=0.0)
    r = simulate(static(10, 0.01), Constant(0.2), exact, duration_s=100.0, seed=0)
    assert len(r.latencies_s) > 10
    assert set(r.batch_sizes) == {1}
    for x in r.latencies_s:
        assert x == pytest.approx(0.01 + 0.005, abs=1e-9)


def test_batches_respect_the_cap_and_fill_under_load():
    r = simulate(static(10, 0.01), Constant(600.0), SERVICE, duration_s=5.0, seed=0)
    assert max(r.batch_sizes) == 10
    assert sum(1 for b in r.batch_sizes if b == 10) > 0.9 * len(r.batch_sizes)
    assert r.unfinished == 0 and r.rejected == 0
    assert len(r.latencies_s) == sum(r.batch_sizes)


def test_zero_wait_makes_batches_of_one_when_the_model_call_does_not_block():
    # What Ray 2.60 did here: the batch loop closes the next batch while the model runs, so with no wait each
    # holds what queued in the meantime (mean 1.2 with a 20 ms async model call at 400 req/s).
    blocking = simulate(static(10, 0.0), Constant(300.0), SERVICE, duration_s=5.0, seed=0)
    overlapped = simulate(static(10, 0.0), Constant(300.0), SERVICE, duration_s=5.0, seed=0, blocking=False)
    mean = lambda r: sum(r.batch_sizes) / len(r.batch_sizes)
    assert mean(blocking) > 3 and blocking.p99_s < 0.05
    assert mean(overlapped) < 1.5 and overlapped.p99_s > 1.0
    assert overlapped.unfinished == 0


def test_zero_wait_dispatches_at_once():
    exact = LinearServiceTime(fixed_s=0.002, per_item_s=0.0, jitter=0.0)
    r = simulate(static(10, 0.0), Constant(1.0), exact, duration_s=20.0, seed=0)
    assert all(x == pytest.approx(0.002, abs=1e-9) for x in r.latencies_s)


def test_controller_sees_one_window_per_window_s():
    ctl = Static(BatchingConfig(window_s=0.5))
    r = simulate(ctl, Constant(100.0), SERVICE, duration_s=5.0, seed=0)
    assert [round(w.end_s, 6) for w in r.windows] == [0.5 * k for k in range(1, 11)]
    assert sum(w.arrival_rate * 0.5 for w in r.windows) == pytest.approx(r.arrivals)


def test_table_service_time_interpolates():
    table = TableServiceTime(batch_sizes=(1, 8, 32), seconds=(0.002, 0.004, 0.010), jitter=0.0)
    rng = random.Random(0)
    assert table.sample(1, rng) == pytest.approx(0.002)
    assert table.sample(8, rng) == pytest.approx(0.004)
    assert table.sample(20, rng) == pytest.approx(0.007)
    assert table.sample(64, rng) == pytest.approx(0.018)  # extrapolates the last segment


@pytest.mark.parametrize(
    "make",
    [
        lambda: Constant(0.0),
        lambda: Sine(mean=100.0, swing=1.0),
        lambda: Sine(mean=100.0, period_s=0.0),
        lambda: Step(before=-1.0, after=1.0, at_s=1.0),
        lambda: LinearServiceTime(fixed_s=0.0, per_item_s=0.0),
        lambda: LinearServiceTime(fixed_s=0.01, per_item_s=0.0, jitter=-0.1),
        lambda: TableServiceTime(batch_sizes=(4, 2), seconds=(0.1, 0.2)),
        lambda: simulate(Static(), Constant(1.0), SERVICE, duration_s=0.0),
    ],
)
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError, match="must be"):
        make()
