"""The batching-server simulator: arrivals, service-time models, Serve's batch-forming rule, determinism."""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from types import SimpleNamespace

import pytest
from ray import serve

from serve_app.batching import BatchingConfig, BatchingPolicy, ModelQueue, Static
from serve_app.simulator import (
    Constant,
    LinearServiceTime,
    Sine,
    Step,
    TableServiceTime,
    poisson_arrivals,
    simulate,
    simulate_arrivals,
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


@pytest.mark.parametrize("handler", ["queue", "blocking"])
def test_batches_respect_the_cap_and_fill_under_load(handler):
    # 800 req/s is over the capacity at the cap (10 / t(10) = 667/s): the backlog fills every batch. (At 600/s
    # the replica's model queue makes batches near the load's fixed point b = rate * t(b), ~8.6, with the wait
    # overlapping the forward; only the blocking handler, whose wait starts after the forward, fills them.)
    r = simulate(static(10, 0.01), Constant(800.0), SERVICE, duration_s=5.0, seed=0, handler=handler)
    assert max(r.batch_sizes) == 10
    assert sum(1 for b in r.batch_sizes if b == 10) > 0.9 * len(r.batch_sizes)
    assert r.unfinished == 0 and r.rejected == 0
    assert len(r.latencies_s) == sum(r.batch_sizes)


def test_zero_wait_makes_batches_of_one_when_the_model_call_does_not_block():
    # What Ray 2.60 did here: the batch loop closes the next batch while the model runs, so with no wait each
    # holds what queued in the meantime (mean 1.2 with a 20 ms async model call at 400 req/s).
    blocking = simulate(static(10, 0.0), Constant(300.0), SERVICE, duration_s=5.0, seed=0, handler="blocking")
    queued = simulate(static(10, 0.0), Constant(300.0), SERVICE, duration_s=5.0, seed=0)  # the replica's
    overlapped = simulate(static(10, 0.0), Constant(300.0), SERVICE, duration_s=5.0, seed=0, handler="awaiting")
    mean = lambda r: sum(r.batch_sizes) / len(r.batch_sizes)
    assert mean(blocking) > 3 and blocking.p99_s < 0.05
    assert queued == blocking  # at a zero wait the model queue makes the blocking handler's batches
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
        lambda: simulate(Static(), Constant(1.0), SERVICE, duration_s=1.0, handler="async"),
        lambda: simulate_arrivals(Static(), [0.5, 0.2], SERVICE, duration_s=1.0),
        lambda: simulate_arrivals(Static(), [0.5, 1.0], SERVICE, duration_s=1.0),
    ],
)
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError, match="must be"):
        make()


class _VirtualClock(selectors.DefaultSelector):
    """An event loop's selector whose clock jumps to the next timer instead of sleeping: nothing here does I/O,
    so a select that would wait `timeout` seconds just advances the clock by that much (deterministic, and no
    real time passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.selects = 0

    def select(self, timeout=None):
        self.selects += 1
        if self.selects > 100_000:  # a loop that no longer advances (a bug here): fail, not hang
            raise RuntimeError(f"the virtual clock is stuck at {self.now}")
        events = super().select(0)
        if not events and timeout:
            self.now += timeout
        return events


def _replica_run(arrivals, batch: int, wait_s: float, forward_s: float):
    """The replica's queue discipline on a virtual clock: Ray Serve's own `@serve.batch` closing batches and a
    handler that hands each to a `ModelQueue` and returns, as `ModelServer._batched` does, one forward of
    `forward_s` at a time (ModelQueue.drain). Returns (batch sizes, each request's completion time)."""
    from ray.serve import batching as serve_batching

    clock = _VirtualClock()

    class Loop(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return clock.now

    policy = BatchingPolicy(static(batch, wait_s))
    queue: ModelQueue[int] = ModelQueue(policy)
    sizes: list[int] = []
    done: dict[int, float] = {}

    async def forward(ids: list[int]) -> None:
        sizes.append(len(ids))
        await asyncio.sleep(forward_s)
        for i in ids:
            done[i] = clock.now

    class Replica:
        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=wait_s)
        async def batched(self, ids: list[int]) -> list[None]:
            queue.feed(ids, forward)
            return [None] * len(ids)

    async def main() -> None:
        replica = Replica()

        async def request(i: int, t: float) -> None:
            await asyncio.sleep(t - clock.now)
            assert policy.arrive().admitted
            await replica.batched(i)

        await asyncio.gather(*(request(i, t) for i, t in enumerate(arrivals)))
        while len(done) < len(arrivals):
            await asyncio.sleep(forward_s)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # Ray's batch loop
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    loop = Loop(clock)
    with pytest.MonkeyPatch.context() as mp:
        # Ray's batch queue times its wait with time.time(): on the virtual clock here. Its warning about
        # max_ongoing_requests reads the replica's context, which this run has not.
        mp.setattr(serve_batching, "time", SimpleNamespace(time=loop.time))
        mp.setattr(
            serve_batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None
        )
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    return sizes, [done[i] for i in range(len(arrivals))]


def test_the_simulator_batches_as_the_replicas_serve_batch_and_model_queue_do():
    """A static wait above 0 and a forward longer than it: Serve closes batches while the model runs and the
    next forward merges what they hold (up to the cap). The simulator's batches and completion times equal
    those of Ray's real batch queue feeding the replica's ModelQueue with the same arrivals; the blocking
    handler's model (the simulator before the forward thread, whose wait starts after the forward) does not."""
    # Times on a grid of 1/1024 s, exact in binary floating point: Ray's batch queue closes a batch when
    # `now - start >= wait`, which decimal times would miss by an ulp (and wait again, for nothing, forever).
    tick = 1 / 1024
    arrivals = [tick * k for k in (0, 4, 13, 21, 26, 33, 37, 41, 47, 58, 64, 71, 102, 180, 183, 196, 201, 205,
                                   211, 219, 234, 248, 262, 301)]  # fmt: skip
    batch, wait, forward_s = 4, 10 * tick, 25 * tick
    sizes, done = _replica_run(arrivals, batch, wait, forward_s)
    exact = LinearServiceTime(fixed_s=forward_s, per_item_s=0.0, jitter=0.0)

    def sim(handler: str):
        r = simulate_arrivals(static(batch, wait), arrivals, exact, duration_s=0.4, handler=handler)
        return list(r.batch_sizes), [a + x for a, x in zip(arrivals, r.latencies_s, strict=True)]

    got_sizes, got_done = sim("queue")
    assert max(sizes) == batch and min(sizes) < batch  # the cap and partial batches both shaped this run
    assert got_sizes == sizes
    assert got_done == pytest.approx(done, abs=1e-6)
    old_sizes, old_done = sim("blocking")
    assert (old_sizes, pytest.approx(old_done, abs=1e-6)) != (sizes, done)
