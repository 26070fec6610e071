"""Deterministic discrete-event simulator of one batching replica, for tests and to pre-train the bandit.

Open-loop Poisson arrivals whose rate follows a pattern (`Constant`, `Step`, `Sine`); a service-time model
(`LinearServiceTime`, `TableServiceTime`) gives each batch's execution time. The server is the replica's:
Serve's `@serve.batch` (`max_concurrent_batches=1`) opens a batch when a request waits and closes it when it
holds max_batch_size requests or batch_wait_timeout_s after opening, and hands it to the replica's model queue
(serve_app.batching.ModelQueue, the class the replica uses), from which one forward at a time takes what
waits, up to the cap (`simulate_arrivals` also models the older handlers that block on or await the model);
settings changed by the controller apply from the next batch (Ray reads them when a
batch opens). Arrivals, batches, answers and the `window_s` ticks go through a `BatchingPolicy`, the object the
replica (ModelServer) drives: the same admission check and liveness rule, the same window bookkeeping, so a
controller trained here (the bandit) meets the rules it will run under. Same seed, same inputs: same result.
"""

from __future__ import annotations

import heapq
import math
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from serve_app.batching import (
    AdmissionControl,
    Bandit,
    BatchingPolicy,
    BatchSettings,
    Controller,
    ModelQueue,
    window_reward,
)

# ---------------------------------------------------------------------------------------------- arrival rates


class ArrivalPattern(ABC):
    """Arrival rate (requests/s) as a function of time."""

    @abstractmethod
    def rate(self, t: float) -> float: ...

    @abstractmethod
    def max_rate(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Constant(ArrivalPattern):
    rps: float

    def __post_init__(self) -> None:
        if not self.rps > 0:
            raise ValueError(f"rps must be > 0, got {self.rps!r}")

    def rate(self, t: float) -> float:
        return self.rps

    def max_rate(self) -> float:
        return self.rps


@dataclass(frozen=True, slots=True)
class Step(ArrivalPattern):
    """`before` requests/s until `at_s`, then `after`."""

    before: float
    after: float
    at_s: float

    def __post_init__(self) -> None:
        if not (self.before > 0 and self.after > 0):
            raise ValueError(f"rates must be > 0, got {(self.before, self.after)!r}")

    def rate(self, t: float) -> float:
        return self.before if t < self.at_s else self.after

    def max_rate(self) -> float:
        return max(self.before, self.after)


@dataclass(frozen=True, slots=True)
class Sine(ArrivalPattern):
    """mean * (1 + swing * sin(2 pi t / period_s)): swing=0.5 is the issue's +-50%."""

    mean: float
    swing: float = 0.5
    period_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.mean > 0:
            raise ValueError(f"mean must be > 0, got {self.mean!r}")
        if not 0 <= self.swing < 1:
            raise ValueError(f"swing must be in [0, 1), got {self.swing!r}")
        if not self.period_s > 0:
            raise ValueError(f"period_s must be > 0, got {self.period_s!r}")

    def rate(self, t: float) -> float:
        return self.mean * (1 + self.swing * math.sin(2 * math.pi * t / self.period_s))

    def max_rate(self) -> float:
        return self.mean * (1 + self.swing)


def poisson_arrivals(pattern: ArrivalPattern, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times of a non-homogeneous Poisson process with the pattern's rate (Lewis-Shedler thinning)."""
    lam = pattern.max_rate()
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(lam)
        if t >= duration_s:
            return out
        if rng.random() * lam <= pattern.rate(t):
            out.append(t)


# ---------------------------------------------------------------------------------------------- service times


class ServiceTime(ABC):
    """Execution time of one batch."""

    @abstractmethod
    def sample(self, batch_size: int, rng: random.Random) -> float: ...


@dataclass(frozen=True, slots=True)
class LinearServiceTime(ServiceTime):
    """(fixed_s + per_item_s * b) times log-normal noise with sigma `jitter` (median 1)."""

    fixed_s: float
    per_item_s: float
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.fixed_s < 0 or self.per_item_s < 0 or self.fixed_s + self.per_item_s <= 0:
            raise ValueError(f"fixed_s, per_item_s must be >= 0 and not both 0, got {(self.fixed_s, self.per_item_s)}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter!r}")

    def sample(self, batch_size: int, rng: random.Random) -> float:
        noise = rng.lognormvariate(0.0, self.jitter) if self.jitter else 1.0
        return (self.fixed_s + self.per_item_s * batch_size) * noise


@dataclass(frozen=True, slots=True)
class TableServiceTime(ServiceTime):
    """Measured median times per batch size (e.g. from bench/), linearly interpolated/extrapolated, with
    noise."""

    batch_sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if len(self.batch_sizes) < 2 or len(self.batch_sizes) != len(self.seconds):
            raise ValueError(
                f"batch_sizes and seconds must be equal-length, >= 2 entries, got "
                f"{len(self.batch_sizes)} and {len(self.seconds)}"
            )
        if any(x >= y for x, y in zip(self.batch_sizes, self.batch_sizes[1:], strict=False)):
            raise ValueError(f"batch_sizes must be increasing, got {self.batch_sizes}")

    def sample(self, batch_size: int, rng: random.Random) -> float:
        bs, ts = self.batch_sizes, self.seconds
        i = min(max(1, next((k for k, b in enumerate(bs) if b >= batch_size), len(bs) - 1)), len(bs) - 1)
        t = ts[i - 1] + (ts[i] - ts[i - 1]) * (batch_size - bs[i - 1]) / (bs[i] - bs[i - 1])
        noise = rng.lognormvariate(0.0, self.jitter) if self.jitter else 1.0
        return max(t, 1e-6) * noise


# ------------------------------------------------------------------------------------------------- simulation


@dataclass(frozen=True, slots=True)
class WindowTrace:
    """One control window as the controller saw it, and what it decided."""

    end_s: float
    arrival_rate: float
    queue_len: int
    rejected: int
    p99_s: float | None
    settings: BatchSettings


@dataclass(frozen=True, slots=True)
class SimResult:
    slo_s: float
    duration_s: float
    latencies_s: tuple[float, ...]
    """Latency of each served request, in arrival order."""
    rejected: int
    unfinished: int
    """Admitted but not done when the arrivals ended and the queue was drained (0: the simulation drains)."""
    batch_sizes: tuple[int, ...]
    windows: tuple[WindowTrace, ...]
    rewards: tuple[float, ...] = ()
    """Per-window reward (batching.window_reward), the bandit's objective, for any controller."""

    @property
    def arrivals(self) -> int:
        return len(self.latencies_s) + self.rejected

    def quantile(self, q: float) -> float:
        """q-quantile of served-request latency (inf if nothing was served)."""
        if not self.latencies_s:
            return math.inf
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]

    @property
    def p50_s(self) -> float:
        return self.quantile(0.5)

    @property
    def p99_s(self) -> float:
        return self.quantile(0.99)

    @property
    def attainment(self) -> float:
        """Share of all arrivals answered within the SLO (rejections count as misses)."""
        ok = sum(1 for x in self.latencies_s if x <= self.slo_s)
        return ok / max(1, self.arrivals)

    @property
    def goodput_rps(self) -> float:
        """Requests answered within the SLO per second."""
        return sum(1 for x in self.latencies_s if x <= self.slo_s) / self.duration_s

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else math.nan


_ARRIVAL, _CLOSE, _DONE, _TICK = 0, 1, 2, 3
HANDLERS = ("queue", "blocking", "awaiting")
"""How the batch handler meets the model (`simulate`'s `handler`)."""


def simulate(
    controller: Controller,
    pattern: ArrivalPattern,
    service: ServiceTime,
    *,
    duration_s: float,
    seed: int = 0,
    admission: AdmissionControl | None = None,
    miss_penalty: float = 4.0,
    handler: str = "queue",
) -> SimResult:
    """Runs `duration_s` of Poisson arrivals (`pattern`, `seed`) through one replica driven by `controller`,
    then drains the queue (`simulate_arrivals`)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    rng = random.Random(seed)
    arrivals = poisson_arrivals(pattern, duration_s, rng)
    return simulate_arrivals(
        controller,
        arrivals,
        service,
        duration_s=duration_s,
        rng=rng,
        admission=admission,
        miss_penalty=miss_penalty,
        handler=handler,
    )


def simulate_arrivals(
    controller: Controller,
    arrivals: Sequence[float],
    service: ServiceTime,
    *,
    duration_s: float,
    rng: random.Random | None = None,
    admission: AdmissionControl | None = None,
    miss_penalty: float = 4.0,
    handler: str = "queue",
) -> SimResult:
    """Runs the requests arriving at `arrivals` (seconds, ascending, in [0, duration_s)) through one replica
    driven by `controller`, then drains the queue; `rng` draws the service times' noise.

    Serve's batch queue (Ray's `_BatchQueue.wait_for_batch`) opens a batch when a request waits and closes it
    when it holds max_batch_size requests or batch_wait_timeout_s after it opened, with the settings in force
    when it opened. `handler`, how the closed batch meets the model:
    - "queue" (the replica, serve_app/replica.py): the handler hands the batch to the model queue and returns,
      so Serve goes on closing batches while the model runs; each forward takes the oldest requests waiting
      there, up to the cap in force when it starts (serve_app.batching.ModelQueue, the replica's own class).
    - "blocking": the handler runs the model synchronously, holding the event loop, so the next batch opens
      only when the model returns (measured with Ray 2.60: a 20 ms blocking call at 400 req/s and wait 0 made
      batches of 8). Same batches as "queue" at a zero wait; with a wait, the wait starts after the forward.
    - "awaiting": the handler awaits the model (asyncio.to_thread, async GPU work): Ray closes the next batch
      while one executes and queues it for the model as it is; a zero wait then makes batches of one
      (measured: mean 1.2, and 1 s of that load took 7.5 s).
    `miss_penalty` only weighs the per-window rewards reported in the result (a Bandit uses its own)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    if handler not in HANDLERS:
        raise ValueError(f"handler must be one of {HANDLERS}, got {handler!r}")
    arrivals = list(arrivals)
    if any(not 0 <= t < duration_s for t in arrivals) or arrivals != sorted(arrivals):
        raise ValueError(f"arrivals must be ascending times in [0, duration_s={duration_s}), got {arrivals[:5]}...")
    rng = rng if rng is not None else random.Random(0)
    slo = controller.config.slo_s
    window = controller.config.window_s
    events: list[tuple[float, int, int, int]] = []  # (time, kind, seq, payload): kind orders ties
    seq = 0

    def push(t: float, kind: int, payload: int = 0) -> None:
        nonlocal seq
        heapq.heappush(events, (t, kind, seq, payload))
        seq += 1

    for i, t in enumerate(arrivals):
        push(t, _ARRIVAL, i)
    push(window, _TICK)

    # The replica's own batching state and rules (ModelServer drives the same object); refusals only when a
    # gate is given, and no calibration (the batch model is the whole simulated server).
    policy = BatchingPolicy(controller, enforce=admission is not None, calibrate=False, admission=admission)
    blocking = handler == "blocking"
    model_queue: ModelQueue[int] = ModelQueue(policy)  # closed batches, for handler="queue"
    ready: deque[list[int]] = deque()  # closed batches waiting for the model as they are (the other handlers)
    latency = [math.nan] * len(arrivals)
    queue: deque[int] = deque()  # admitted, not in a closed batch (Serve's batch queue)
    executing: list[int] = []
    executing_s = 0.0
    forming = False  # a batch is open, waiting to fill or time out
    batch_token = 0  # invalidates the CLOSE timer of a batch that closed early (full)
    open_settings = controller.settings
    rejected = 0
    batch_sizes: list[int] = []
    traces: list[WindowTrace] = []
    rewards: list[float] = []

    def waiting_for_model() -> int:
        return len(model_queue) + sum(map(len, ready))

    def start_next(now: float) -> None:
        nonlocal executing, executing_s
        if handler == "queue":
            executing = model_queue.take()  # counts the batch's start (policy.batch_start)
        else:
            executing = ready.popleft()
            policy.batch_start(len(executing))
        executing_s = service.sample(len(executing), rng)
        batch_sizes.append(len(executing))
        push(now + executing_s, _DONE)

    def close_batch(now: float) -> None:
        nonlocal forming
        batch = [queue.popleft() for _ in range(min(open_settings.max_batch_size, len(queue)))]
        if handler == "queue":
            model_queue.put(batch)
        else:
            ready.append(batch)
        forming = False
        if not executing:
            start_next(now)
        if not blocking and queue:  # Ray's batch loop goes straight back to its queue
            open_batch(now)

    def open_batch(now: float) -> None:
        nonlocal forming, batch_token, open_settings
        open_settings = controller.settings
        if len(queue) >= open_settings.max_batch_size or open_settings.batch_wait_timeout_s <= 0:
            close_batch(now)
            return
        forming = True
        batch_token += 1
        push(now + open_settings.batch_wait_timeout_s, _CLOSE, batch_token)

    while events:
        now, kind, _, payload = heapq.heappop(events)
        if kind == _ARRIVAL:
            if not policy.arrive().admitted:  # the replica's admission check and liveness rule
                rejected += 1
                continue
            queue.append(payload)
            if not forming and not (blocking and executing):
                open_batch(now)
            elif forming and len(queue) >= open_settings.max_batch_size:
                close_batch(now)
        elif kind == _CLOSE:
            if forming and payload == batch_token:
                close_batch(now)
        elif kind == _DONE:
            policy.batch_end(len(executing), executing_s)
            for i in executing:
                latency[i] = now - arrivals[i]
                policy.done(latency[i])
            executing = []
            if waiting_for_model():
                start_next(now)
            elif blocking and queue:
                open_batch(now)
        else:  # _TICK
            stats, settings = policy.tick(now)
            assert stats.queue_len == len(queue) + waiting_for_model()
            r = window_reward(stats, slo, miss_penalty)
            if r is not None:
                rewards.append(r)
            traces.append(
                WindowTrace(
                    now, stats.arrival_rate, stats.queue_len, stats.rejected, stats.latency_quantile(0.99), settings
                )
            )
            if now + window <= duration_s + 1e-9:
                push(now + window, _TICK)

    served = tuple(x for x in latency if not math.isnan(x))
    return SimResult(
        slo_s=slo,
        duration_s=duration_s,
        latencies_s=served,
        rejected=rejected,
        unfinished=len(arrivals) - len(served) - rejected,
        batch_sizes=tuple(batch_sizes),
        windows=tuple(traces),
        rewards=tuple(rewards),
    )


def train_bandit(
    bandit: Bandit,
    scenarios: Sequence[tuple[ArrivalPattern, ServiceTime]],
    *,
    episodes: int,
    duration_s: float,
    seed: int = 0,
    admission: AdmissionControl | None = None,
) -> list[float]:
    """Pre-trains `bandit` in the simulator, cycling through scenarios; returns the mean reward per
    episode."""
    if episodes < 1 or not scenarios:
        raise ValueError(f"episodes must be >= 1 with >= 1 scenario, got {episodes} and {len(scenarios)}")
    curve = []
    for e in range(episodes):
        pattern, service = scenarios[e % len(scenarios)]
        bandit.reset_window()
        result = simulate(
            bandit,
            pattern,
            service,
            duration_s=duration_s,
            seed=seed + e,
            admission=admission,
            miss_penalty=bandit.bandit.miss_penalty,
        )
        curve.append(result.mean_reward)
    return curve
