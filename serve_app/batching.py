"""Adaptive batching for a Serve model deployment: controllers that set `@serve.batch`'s knobs every window.

Plain Python, no Ray: the Serve app (and the simulator in serve_app/simulator.py) feeds a `WindowRecorder`
with what happens to requests and batches, closes it every `BatchingConfig.window_s` seconds, and hands the
resulting `WindowStats` to a controller, whose `update()` returns the `BatchSettings` to pass to the batch
wrapper's `set_max_batch_size` / `set_batch_wait_timeout_s`. `AdmissionControl` decides per request whether to
queue it or answer 503 + Retry-After at once (issue 6, "Overload protection").

Controllers (one class each, common interface `Controller`):
- `Static`: fixed settings, what `@serve.batch` does today (`Static.serve_defaults()` = 10 / 0.01 s).
- `AIMD`: Clipper (Crankshaw et al., NSDI'17): grow the batch size additively while batches run within the
  SLO's share, cut it multiplicatively when one does not.
- `SLOModel` (the default): fits t(b) = a + c*b online; the largest cap whose worst case fits the SLO, and
  the wait that lets batches fill at the current rate when the model call does not block the loop.
- `Bandit`: contextual epsilon-greedy bandit over a (batch size, wait) grid per load level; JSON save/load.

Server model behind the latency estimates: one batch executes at a time (`max_concurrent_batches=1`); a batch
opens when a request waits, and closes when it holds `max_batch_size` requests or `batch_wait_timeout_s` after
it opened (Ray's `_BatchQueue.wait_for_batch`). If the model call blocks the replica's event loop (a plain
synchronous forward pass: `BatchingConfig.model_blocks_loop`, the default) the next batch opens only when it
returns; if the handler awaits the model instead, Ray closes the next batch while one executes, and only the
wait lets batches grow (serve_app/simulator.py simulates both).
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SERVE_DEFAULT_BATCH_SIZE = 10
SERVE_DEFAULT_WAIT_S = 0.01


@dataclass(kw_only=True, slots=True)
class BatchingConfig:
    """Latency objective and the bounds every controller stays within."""

    slo_s: float = 0.1
    """Latency objective (seconds) for the `quantile` of request latency."""
    quantile: float = 0.99
    """Which latency percentile the SLO is about."""
    window_s: float = 1.0
    """Control window: the app closes a WindowRecorder and calls update() this often."""
    min_batch_size: int = 1
    """Smallest max_batch_size a controller may set."""
    max_batch_size: int = 64
    """Largest max_batch_size a controller may set (max_ongoing_requests must be at least this)."""
    max_wait_s: float = 0.05
    """Largest batch_wait_timeout_s a controller may set; must be below slo_s (a wait alone never breaks
    it)."""
    initial_batch_size: int = SERVE_DEFAULT_BATCH_SIZE
    """Settings before the first window."""
    initial_wait_s: float = SERVE_DEFAULT_WAIT_S
    """Wait before the first window."""
    max_queue_len: int | None = 256
    """Bounded queue: requests beyond this many waiting are rejected (None: unbounded)."""
    target_utilization: float = 0.7
    """With a non-blocking model call, SLOModel waits long enough that rate * t(b) / b stays below this."""
    model_blocks_loop: bool = True
    """True when the batch handler calls the model synchronously, holding the replica's event loop, so the
    next batch forms only once it returns. False when it awaits the model (asyncio.to_thread, async GPU work):
    Ray then closes batches while one executes, and a zero wait makes batches of one (see
    serve_app/simulator)."""

    def __post_init__(self) -> None:
        _check(self.slo_s > 0, "slo_s must be > 0", self.slo_s)
        _check(0.5 <= self.quantile < 1, "quantile must be in [0.5, 1)", self.quantile)
        _check(self.window_s > 0, "window_s must be > 0", self.window_s)
        _check(
            _is_int(self.min_batch_size) and self.min_batch_size >= 1,
            "min_batch_size must be an int >= 1",
            self.min_batch_size,
        )
        _check(
            _is_int(self.max_batch_size) and self.max_batch_size >= self.min_batch_size,
            f"max_batch_size must be an int >= min_batch_size ({self.min_batch_size})",
            self.max_batch_size,
        )
        _check(
            0 <= self.max_wait_s < self.slo_s,
            f"max_wait_s must be in [0, slo_s={self.slo_s})",
            self.max_wait_s,
        )
        _check(
            _is_int(self.initial_batch_size) and self.min_batch_size <= self.initial_batch_size <= self.max_batch_size,
            f"initial_batch_size must be an int in [{self.min_batch_size}, {self.max_batch_size}]",
            self.initial_batch_size,
        )
        _check(
            0 <= self.initial_wait_s <= self.max_wait_s,
            f"initial_wait_s must be in [0, {self.max_wait_s}]",
            self.initial_wait_s,
        )
        _check(
            self.max_queue_len is None or (_is_int(self.max_queue_len) and self.max_queue_len >= 1),
            "max_queue_len must be None or an int >= 1",
            self.max_queue_len,
        )
        _check(0 < self.target_utilization <= 1, "target_utilization must be in (0, 1]", self.target_utilization)

    @staticmethod
    def slo_fields(slo_s: float) -> dict[str, float]:
        """The fields `tandem serve --slo-ms` sets: the SLO, and waits kept well below it (a wait alone must
        stay below the SLO)."""
        max_wait = min(0.05, slo_s / 2)
        return {"slo_s": slo_s, "max_wait_s": max_wait, "initial_wait_s": min(0.01, max_wait)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchingConfig:
        """Builds a config from a dict (a Serve user_config); unknown keys are an error, not silently
        dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"batching config keys must be among {sorted(known)}, got unknown {unknown}")
        return cls(**d)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, what: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{what}, got {got!r}")


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """What a controller decides: the two runtime knobs of `@serve.batch`."""

    max_batch_size: int
    batch_wait_timeout_s: float


# ---------------------------------------------------------------------------------------------- observations


@dataclass(kw_only=True, slots=True)
class WindowStats:
    """Everything a controller sees about one control window."""

    duration_s: float
    """Length of the window in seconds."""
    arrivals: int
    """Requests that arrived (admitted or not)."""
    queue_len: int
    """Requests waiting (not yet in an executing batch) when the window closed."""
    batch_sizes: Sequence[int] = ()
    """Size of each batch that finished executing in the window."""
    service_times_s: Sequence[float] = ()
    """Execution time of each of those batches (same order)."""
    latencies_s: Sequence[float] = ()
    """End-to-end latency of each request completed in the window."""
    rejected: int = 0
    """Requests refused by admission control or the queue bound."""

    @property
    def arrival_rate(self) -> float:
        return self.arrivals / self.duration_s

    def latency_quantile(self, q: float) -> float | None:
        """Empirical q-quantile of completed-request latency (None when nothing completed)."""
        if not self.latencies_s:
            return None
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]

    def slo_misses(self, slo_s: float) -> int:
        """Completed requests over the SLO, plus rejected ones."""
        return sum(1 for x in self.latencies_s if x > slo_s) + self.rejected


class WindowRecorder:
    """Collects events as they happen and turns them into one WindowStats per control window.

    The replica calls `arrival()` for every request (then `rejected()` if admission control refuses it),
    `batch_start(n)` when `@serve.batch` hands it a batch, `batch_end(n, seconds)` when the model returns, and
    `done(latency)` per answered request; `queue_len` (admitted, not yet in a batch) follows from these
    counts.
    """

    def __init__(self, start: float) -> None:
        self._start = start
        self._admitted_total = 0
        self._started_total = 0
        self._reset()

    def _reset(self) -> None:
        self._arrivals = 0
        self._rejected = 0
        self._batch_sizes: list[int] = []
        self._service_times: list[float] = []
        self._latencies: list[float] = []

    @property
    def queue_len(self) -> int:
        """Requests admitted and not yet in an executing batch."""
        return self._admitted_total - self._started_total

    def arrival(self) -> None:
        self._arrivals += 1
        self._admitted_total += 1

    def rejected(self) -> None:
        """The request just counted by arrival() was refused."""
        self._rejected += 1
        self._admitted_total -= 1

    def batch_start(self, size: int) -> None:
        self._started_total += size

    def batch_end(self, size: int, service_s: float) -> None:
        self._batch_sizes.append(size)
        self._service_times.append(service_s)

    def done(self, latency_s: float) -> None:
        self._latencies.append(latency_s)

    def close(self, now: float) -> WindowStats:
        """Ends the window at `now` (same clock as `start`) and starts the next one."""
        stats = WindowStats(
            duration_s=max(now - self._start, 1e-9),
            arrivals=self._arrivals,
            queue_len=self.queue_len,
            batch_sizes=self._batch_sizes,
            service_times_s=self._service_times,
            latencies_s=self._latencies,
            rejected=self._rejected,
        )
        self._start = now
        self._reset()
        return stats


# ------------------------------------------------------------------------------------------ service-time fit


class ServiceTimeFit:
    """Online fit of batch execution time t(b) = a + c*b, plus a high quantile of the multiplicative noise.

    Weighted least squares over (batch size, seconds) pairs with exponential forgetting (`decay` per batch),
    so the fit follows a model swap or a change in CPU contention. While only one batch size has been seen the
    slope is not identifiable; the fit then assumes t proportional to b (a = 0), which is pessimistic about
    what batching buys, so a controller only grows batches once it has seen that they pay.
    """

    def __init__(self, decay: float = 0.995, noise_window: int = 512) -> None:
        assert 0 < decay <= 1
        self.decay = decay
        self._w = self._sb = self._st = self._sbb = self._sbt = 0.0
        self._ratios: deque[float] = deque(maxlen=noise_window)
        self._noise_cache: dict[float, float] = {}  # q -> quantile; cleared on every observation
        self.a = 0.0
        self.c = 0.0
        self.typical_batch: float | None = None
        """Moving average of executed batch sizes (None before any)."""

    @property
    def ready(self) -> bool:
        return self._w > 0

    def observe(self, batch_sizes: Sequence[int], service_times_s: Sequence[float]) -> None:
        self._noise_cache.clear()
        for b, t in zip(batch_sizes, service_times_s, strict=True):
            if self.ready:
                self._ratios.append(t / max(self.mean(b), 1e-12))
            d = self.decay
            self._w = d * self._w + 1.0
            self._sb = d * self._sb + b
            self._st = d * self._st + t
            self._sbb = d * self._sbb + b * b
            self._sbt = d * self._sbt + b * t
            self.typical_batch = b if self.typical_batch is None else 0.9 * self.typical_batch + 0.1 * b
            self._solve()

    def _solve(self) -> None:
        mb, mt = self._sb / self._w, self._st / self._w
        var_b = self._sbb / self._w - mb * mb
        if var_b < 0.25:  # one batch size only (the variance of {b, b+1} is 0.25)
            self.a, self.c = 0.0, mt / mb
            return
        c = (self._sbt / self._w - mb * mt) / var_b
        a = mt - c * mb
        if c < 0:  # larger batches were faster: noise; treat time as flat in b
            a, c = mt, 0.0
        elif a < 0:  # refit through the origin
            a, c = 0.0, self._sbt / self._sbb
        self.a, self.c = a, c

    def mean(self, b: int) -> float:
        """Expected execution time of a batch of b (seconds); 0 before any observation."""
        return self.a + self.c * b

    def noise_quantile(self, q: float) -> float:
        """q-quantile of observed / predicted time (>= 1; the largest ratio while there are few)."""
        if q not in self._noise_cache:
            xs = sorted(self._ratios)
            self._noise_cache[q] = max(1.0, xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)] if xs else 1.0)
        return self._noise_cache[q]

    def high(self, b: int, q: float) -> float:
        """q-quantile estimate of the execution time of a batch of b."""
        return self.mean(b) * self.noise_quantile(q)

    def drain_time(self, n: int, max_batch_size: int, q: float) -> float:
        """Time until the n-th waiting request finishes: the batch executing now (of the typical size seen
        lately, rather than a full one, which would refuse light bursts on a pessimistic extrapolation), then
        batches of max_batch_size back to back, each at the q-quantile time."""
        assert self.typical_batch is not None, "no batch observed yet"
        running = min(max_batch_size, max(1, round(self.typical_batch)))
        full, rest = divmod(n, max_batch_size)
        t = self.high(running, q) + full * self.high(max_batch_size, q)
        return t + (self.high(rest, q) if rest else 0.0)


# ------------------------------------------------------------------------------------------------ controllers


class Controller(ABC):
    """Common interface: `settings` (in force now), `update(stats)` once per window, and optionally
    `observe_batch(size, seconds)` after every batch.

    The service-time fit (used by SLOModel and AdmissionControl) learns either from every batch as it ends,
    through `observe_batch` - then admission control works from the first batch, not the first window - or,
    when no batch was reported that way since the last window, from the window's batches in `update`.
    """

    def __init__(self, config: BatchingConfig | None = None) -> None:
        self.config = config if config is not None else BatchingConfig()
        self.fit = ServiceTimeFit()
        self._settings = BatchSettings(self.config.initial_batch_size, self.config.initial_wait_s)
        self._observed = 0  # batches reported through observe_batch since the last update

    @property
    def settings(self) -> BatchSettings:
        return self._settings

    def observe_batch(self, size: int, service_s: float) -> None:
        """One batch of `size` requests took `service_s` seconds to execute."""
        self.fit.observe((size,), (service_s,))
        self._observed += 1

    def update(self, stats: WindowStats) -> BatchSettings:
        """Learns from one window's observations and returns the (clamped) settings for the next window."""
        if not self._observed:
            self.fit.observe(stats.batch_sizes, stats.service_times_s)
        self._observed = 0
        b, w = self._decide(stats)
        cfg = self.config
        self._settings = BatchSettings(
            max_batch_size=int(min(max(b, cfg.min_batch_size), cfg.max_batch_size)),
            batch_wait_timeout_s=float(min(max(w, 0.0), cfg.max_wait_s)),
        )
        return self._settings

    @abstractmethod
    def _decide(self, stats: WindowStats) -> tuple[int, float]:
        """(max_batch_size, batch_wait_timeout_s) for the next window, before clamping to the config's
        bounds."""


class Static(Controller):
    """Fixed settings (the config's initial ones): what `@serve.batch` does without a controller."""

    @classmethod
    def serve_defaults(cls, slo_s: float = 0.1) -> Static:
        """Serve's own defaults, max_batch_size=10 and batch_wait_timeout_s=0.01, with no queue bound."""
        return cls(
            BatchingConfig(
                slo_s=slo_s,
                initial_batch_size=SERVE_DEFAULT_BATCH_SIZE,
                initial_wait_s=SERVE_DEFAULT_WAIT_S,
                max_queue_len=None,
            )
        )

    def _decide(self, stats: WindowStats) -> tuple[int, float]:
        return self._settings.max_batch_size, self._settings.batch_wait_timeout_s


class AIMD(Controller):
    """Clipper's additive-increase / multiplicative-decrease on the batch size; the wait stays fixed.

    As in Clipper the signal is the batch execution time, not end-to-end latency: grow by `step` while the
    window's slowest batch took at most `service_share` of the SLO (a request may wait for one batch and then
    be served in the next, hence 0.5), cut by `backoff` when one took longer. Reacting to queueing delay
    instead would shrink batches under overload, lowering throughput exactly when it is short. One refinement:
    the size only grows in windows where some batch reached it, so a lightly loaded server does not drift to a
    cap it never uses and then serve a burst with it.
    """

    def __init__(
        self,
        config: BatchingConfig | None = None,
        *,
        step: int = 1,
        backoff: float = 0.9,
        service_share: float = 0.5,
    ) -> None:
        super().__init__(config)
        _check(_is_int(step) and step >= 1, "step must be an int >= 1", step)
        _check(0 < backoff < 1, "backoff must be in (0, 1)", backoff)
        _check(0 < service_share <= 1, "service_share must be in (0, 1]", service_share)
        self.step = step
        self.backoff = backoff
        self.service_share = service_share

    def _decide(self, stats: WindowStats) -> tuple[int, float]:
        b, w = self._settings.max_batch_size, self._settings.batch_wait_timeout_s
        if not stats.service_times_s:
            return b, w
        if max(stats.service_times_s) > self.service_share * self.config.slo_s:
            return min(b - 1, math.floor(b * self.backoff)), w
        if max(stats.batch_sizes) >= b:
            return b + self.step, w
        return b, w


class SLOModel(Controller):
    """Picks the batch size and wait from the fitted t(b) = a + c*b, the SLO and the arrival rate.

    Cap: the largest b whose worst case - a full batch executing when a request arrives, then its own:
    2 * t_q(b) - fits the latency budget: the most capacity (b / t(b) grows with b when a > 0) that cannot by
    itself break the SLO. Wait, when the model call blocks the loop (`model_blocks_loop`, the default): 0. The
    next batch then forms while the last one runs and takes what queued meanwhile, so batch sizes follow the
    load's own fixed point b* = rate * t(b*) - small under light load, larger under heavy load - and waiting
    would only add latency. When the model call does not block, Ray closes batches while one executes, so
    batches are as large as the wait lets them grow: the wait is the time the (predicted) rate needs to fill
    the smallest batch b with rate * t(b) <= target_utilization * b - 0 under light load, longer under heavy
    load - capped so that it plus 2 * t_q(b) stays within the budget (a wait never breaks the SLO by itself).

    The budget is the SLO times a safety factor that shrinks when a window's observed percentile misses the
    SLO without a backlog (model error, not load: shrinking under a backlog would cut capacity when it is
    short) and recovers slowly. The rate, one window ahead (last rate plus its rise, plus the backlog drained
    within a window), also gives the expected operating point `utilization` = rate * t(cap) / cap: above 1 the
    cap cannot keep up and AdmissionControl sheds the excess.
    """

    def __init__(self, config: BatchingConfig | None = None, *, min_safety: float = 0.3) -> None:
        super().__init__(config)
        _check(0 < min_safety <= 1, "min_safety must be in (0, 1]", min_safety)
        self.min_safety = min_safety
        self.safety = 1.0
        self.utilization: float | None = None
        """Predicted load / capacity at the chosen cap for the next window (None before the first fit)."""
        self._last_rate: float | None = None

    def predicted_rate(self, stats: WindowStats) -> float:
        rate = stats.arrival_rate
        rise = max(0.0, rate - self._last_rate) if self._last_rate is not None else 0.0
        self._last_rate = rate
        return rate + rise + stats.queue_len / self.config.window_s

    def _decide(self, stats: WindowStats) -> tuple[int, float]:
        cfg = self.config
        p = stats.latency_quantile(cfg.quantile)
        backlogged = stats.queue_len > self._settings.max_batch_size
        if p is not None and p > cfg.slo_s and not backlogged:
            self.safety = max(self.min_safety, self.safety * 0.8)
        elif p is None or p <= cfg.slo_s:
            self.safety = min(1.0, self.safety + 0.05)
        rate = self.predicted_rate(stats)
        if not self.fit.ready:
            return self._settings.max_batch_size, self._settings.batch_wait_timeout_s
        budget = cfg.slo_s * self.safety
        cap = cfg.min_batch_size  # nothing smaller helps even if its worst case misses too
        for b in range(cfg.min_batch_size, cfg.max_batch_size + 1):
            if 2 * self.fit.high(b, cfg.quantile) <= budget:
                cap = b
        self.utilization = rate * self.fit.mean(cap) / cap
        if cfg.model_blocks_loop or rate <= 0:
            return cap, 0.0
        # Size the batch for the rate plus 3 sigma of a window's Poisson count: at low rates the count is noisy
        # and one window of batches of one under a rate that needs two already builds a backlog.
        hi = rate + 3 * math.sqrt(rate / cfg.window_s)
        fill = next((b for b in range(1, cap + 1) if hi * self.fit.mean(b) <= cfg.target_utilization * b), cap)
        # Overloaded, when even that wait plus two batches exceeds the budget: the largest batch that fits it.
        while fill > 1 and (fill - 1) / hi + 2 * self.fit.high(fill, cfg.quantile) > budget:
            fill -= 1
        return cap, (fill - 1) / hi


# ----------------------------------------------------------------------------------------------------- bandit


def window_reward(stats: WindowStats, slo_s: float, miss_penalty: float) -> float | None:
    """(completed - miss_penalty * SLO misses) / arrivals: throughput relative to the offered load, penalised
    for completions over the SLO and rejections. None for a window without arrivals."""
    if stats.arrivals == 0:
        return None
    return (len(stats.latencies_s) - miss_penalty * stats.slo_misses(slo_s)) / stats.arrivals


@dataclass(kw_only=True, slots=True)
class BanditConfig:
    """The bandit's action grid, load levels and learning settings."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """Candidate max_batch_size values (clamped to BatchingConfig's bounds when applied)."""
    waits_s: tuple[float, ...] = (0.0, 0.002, 0.005, 0.01, 0.02)
    """Candidate batch_wait_timeout_s values; each must be below the SLO."""
    rate_edges: tuple[float, ...] = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
    """Arrival-rate bin edges (requests/s) that define the load levels (contexts)."""
    epsilon: float = 0.2
    """Exploration probability for a load level never visited; decays as epsilon / sqrt(visits)."""
    min_epsilon: float = 0.02
    """Floor of the exploration probability, so it keeps exploring online (0: only the greedy arm learns)."""
    miss_penalty: float = 4.0
    """Reward = (completed - miss_penalty * SLO misses) / arrivals in the window."""
    seed: int = 0
    """Seed of the exploration RNG (decisions are deterministic given it and the observations)."""

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        self.waits_s = tuple(float(w) for w in self.waits_s)
        self.rate_edges = tuple(float(r) for r in self.rate_edges)
        _check(
            len(self.batch_sizes) > 0 and all(_is_int(b) and b >= 1 for b in self.batch_sizes),
            "batch_sizes must be non-empty ints >= 1",
            self.batch_sizes,
        )
        _check(
            len(self.waits_s) > 0 and all(w >= 0 for w in self.waits_s),
            "waits_s must be non-empty and >= 0",
            self.waits_s,
        )
        _check(
            all(x < y for x, y in zip(self.rate_edges, self.rate_edges[1:], strict=False))
            and all(r > 0 for r in self.rate_edges),
            "rate_edges must be positive and increasing",
            self.rate_edges,
        )
        _check(
            0 <= self.min_epsilon <= self.epsilon <= 1,
            "epsilon, min_epsilon must be 0 <= min_epsilon <= epsilon <= 1",
            (self.min_epsilon, self.epsilon),
        )
        _check(self.miss_penalty >= 0, "miss_penalty must be >= 0", self.miss_penalty)


class Bandit(Controller):
    """Contextual epsilon-greedy bandit: context = load level (arrival-rate bin), arm = (batch size, wait).

    The arm chosen for a window is credited with that window's reward, (completed - penalty * misses) /
    arrivals, where misses are completions over the SLO plus rejections: throughput relative to the offered
    load, penalised for SLO misses. Per (context, arm) a running mean. Learns online forever (with min_epsilon
    > 0); `save`/`load` keep the tables as JSON. Arms the grid offers with a wait at or above the SLO are
    refused at construction.
    """

    def __init__(self, config: BatchingConfig | None = None, bandit: BanditConfig | None = None) -> None:
        super().__init__(config)
        self.bandit = bandit if bandit is not None else BanditConfig()
        bad = [w for w in self.bandit.waits_s if w >= self.config.slo_s]
        _check(not bad, f"bandit waits_s must be below slo_s={self.config.slo_s}", bad)
        self.arms: list[BatchSettings] = [
            BatchSettings(b, w) for b in self.bandit.batch_sizes for w in self.bandit.waits_s
        ]
        n_ctx = len(self.bandit.rate_edges) + 1
        self.counts = [[0] * len(self.arms) for _ in range(n_ctx)]
        self.values = [[0.0] * len(self.arms) for _ in range(n_ctx)]
        self._rng = random.Random(self.bandit.seed)
        self._pending: tuple[int, int] | None = None  # (context, arm) acting in the current window
        self.explore = True
        """False: always exploit (evaluation)."""

    def context(self, rate: float) -> int:
        return bisect.bisect_right(self.bandit.rate_edges, rate)

    def reset_window(self) -> None:
        """Forgets which arm acts now (call between independent episodes so none is credited across them)."""
        self._pending = None

    def _decide(self, stats: WindowStats) -> tuple[int, float]:
        r = window_reward(stats, self.config.slo_s, self.bandit.miss_penalty)
        if self._pending is not None and r is not None:
            ctx, arm = self._pending
            self.counts[ctx][arm] += 1
            self.values[ctx][arm] += (r - self.values[ctx][arm]) / self.counts[ctx][arm]
        ctx = self.context(stats.arrival_rate)
        arm = self._choose(ctx)
        self._pending = (ctx, arm)
        return self.arms[arm].max_batch_size, self.arms[arm].batch_wait_timeout_s

    def _choose(self, ctx: int) -> int:
        counts, values = self.counts[ctx], self.values[ctx]
        visits = sum(counts)
        eps = max(self.bandit.min_epsilon, self.bandit.epsilon / math.sqrt(1 + visits))
        untried = [i for i, n in enumerate(counts) if n == 0]
        if self.explore and untried and visits < len(self.arms):  # try every arm once first
            return untried[self._rng.randrange(len(untried))]
        if self.explore and self._rng.random() < eps:
            return self._rng.randrange(len(self.arms))
        tried = [i for i, n in enumerate(counts) if n > 0]
        if not tried:  # nothing known at this load level: borrow the nearest level that has data
            return self._borrow(ctx)
        return max(tried, key=lambda i: (values[i], -i))

    def _borrow(self, ctx: int) -> int:
        order = sorted(range(len(self.counts)), key=lambda c: (abs(c - ctx), c))
        for c in order:
            tried = [i for i, n in enumerate(self.counts[c]) if n > 0]
            if tried:
                return max(tried, key=lambda i: (self.values[c][i], -i))
        return self._closest_arm(self.config.initial_batch_size, self.config.initial_wait_s)

    def _closest_arm(self, b: int, w: float) -> int:
        return min(
            range(len(self.arms)),
            key=lambda i: (abs(self.arms[i].max_batch_size - b), abs(self.arms[i].batch_wait_timeout_s - w)),
        )

    # JSON, never pickle: a policy file may come from elsewhere.
    def to_dict(self) -> dict[str, Any]:
        version, state, gauss = self._rng.getstate()
        return {
            "format": "tandem.bandit/1",
            "batching": asdict(self.config),
            "bandit": asdict(self.bandit),
            "counts": self.counts,
            "values": self.values,
            "rng": [version, list(state), gauss],
            "pending": list(self._pending) if self._pending is not None else None,
            "settings": [self._settings.max_batch_size, self._settings.batch_wait_timeout_s],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bandit:
        if d.get("format") != "tandem.bandit/1":
            raise ValueError(f"bandit state format must be 'tandem.bandit/1', got {d.get('format')!r}")
        bandit_kw = dict(d["bandit"])
        for k in ("batch_sizes", "waits_s", "rate_edges"):
            bandit_kw[k] = tuple(bandit_kw[k])
        obj = cls(BatchingConfig.from_dict(d["batching"]), BanditConfig(**bandit_kw))
        shape = (len(obj.counts), len(obj.arms))
        for key in ("counts", "values"):
            got = (len(d[key]), len(d[key][0]) if d[key] else 0)
            _check(
                got == shape and all(len(row) == shape[1] for row in d[key]),
                f"{key} must have shape {shape}",
                got,
            )
        obj.counts = [[int(n) for n in row] for row in d["counts"]]
        obj.values = [[float(v) for v in row] for row in d["values"]]
        version, state, gauss = d["rng"]
        obj._rng.setstate((version, tuple(state), gauss))
        pending = d["pending"]
        if pending is not None:
            ok = 0 <= pending[0] < shape[0] and 0 <= pending[1] < shape[1]
            _check(ok, f"pending must index a (context, arm) within {shape}", pending)
            obj._pending = (int(pending[0]), int(pending[1]))
        obj._settings = BatchSettings(int(d["settings"][0]), float(d["settings"][1]))
        return obj

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Bandit:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_bandit_policy(path: str | Path, config: BatchingConfig) -> Bandit:
    """A saved Bandit's tables (arms, load levels, values) under `config`, the serving side's batching config
    (its bounds, window, quantile); ValueError naming the problem when the file is missing or not a policy, or
    was trained for another SLO (its rewards counted misses against that one)."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"bandit_policy {str(path)!r} cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"bandit_policy {str(path)!r} is not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("batching"), dict):
        raise ValueError(f"bandit_policy {str(path)!r} is not a saved bandit (tandem.bandit/1)")
    slo = d["batching"].get("slo_s")
    if not isinstance(slo, (int, float)) or not math.isclose(slo, config.slo_s, rel_tol=1e-9):
        raise ValueError(
            f"bandit_policy {str(path)!r} was trained for slo_s={slo!r}, the replica's is {config.slo_s!r}: "
            f"pre-train it for this SLO (tandem pretrain-bandit --slo-ms {config.slo_s * 1e3:g})"
        )
    # Start at the replica's initial settings, not where training ended (they may exceed this config's bounds).
    initial = [config.initial_batch_size, config.initial_wait_s]
    return Bandit.from_dict({**d, "batching": asdict(config), "settings": initial, "pending": None})


# -------------------------------------------------------------------------------------------------- admission


class LatencyCalibration:
    """Online fit of what clients of the replica see against what the batch model predicts:
    observed = alpha * predicted + beta, by weighted least squares with exponential forgetting over admitted
    requests. The batch model (ServiceTimeFit.drain_time) counts only the model's execution; `beta` picks up the
    per-request work outside it (parsing, the replica's event loop, the batch wrapper) and `alpha` the stretch
    of the queue when other processes take the CPU. It sees only the replica's side of the latency (from the
    admission check to the answer); measured on the handle path here, alpha stayed 1.0-1.6 and beta ~0 while
    clients saw p99 0.25-0.5 s, most of it outside the replica.
    Clamped so that it never predicts less than the batch model does: alpha in [1, max_alpha], beta >= 0.
    Identity until `min_samples` requests have been observed.

    Forgetting is per observation (`decay`) and in time (`half_life_s`): after an overload the admitted requests
    are few, and with per-observation forgetting alone the overload's samples (alpha pinned at its old cap of 10
    was seen) kept refusing a light load for minutes. In time they fade within seconds, and once their weight is
    below `min_samples` the calibration is the identity again.
    """

    def __init__(
        self,
        decay: float = 0.995,
        min_samples: int = 50,
        max_alpha: float = 4.0,
        half_life_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check(0 < decay <= 1, "decay must be in (0, 1]", decay)
        _check(_is_int(min_samples) and min_samples >= 2, "min_samples must be an int >= 2", min_samples)
        _check(max_alpha >= 1, "max_alpha must be >= 1", max_alpha)
        _check(half_life_s > 0, "half_life_s must be > 0", half_life_s)
        self.decay, self.min_samples, self.max_alpha, self.half_life_s = decay, min_samples, max_alpha, half_life_s
        self._clock = clock
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._t = clock()
        self.samples = 0
        self._alpha, self._beta = 1.0, 0.0

    def _fade(self, now: float) -> float:
        return 0.5 ** (max(0.0, now - self._t) / self.half_life_s)

    def observe(self, predicted_s: float, observed_s: float) -> None:
        now = self._clock()
        d, x, y = self.decay * self._fade(now), predicted_s, observed_s
        self._t = now
        self._w = d * self._w + 1.0
        self._sx, self._sy = d * self._sx + x, d * self._sy + y
        self._sxx, self._sxy = d * self._sxx + x * x, d * self._sxy + x * y
        self.samples += 1
        if self._w < self.min_samples:
            self._alpha, self._beta = 1.0, 0.0
            return
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        alpha = (self._sxy / self._w - mx * my) / var if var > 1e-12 else 1.0
        self._alpha = min(max(alpha, 1.0), self.max_alpha)
        self._beta = max(0.0, my - self._alpha * mx)

    def _current(self) -> tuple[float, float]:
        if self._w * self._fade(self._clock()) < self.min_samples:
            return 1.0, 0.0
        return self._alpha, self._beta

    @property
    def alpha(self) -> float:
        return self._current()[0]

    @property
    def beta(self) -> float:
        return self._current()[1]

    def __call__(self, predicted_s: float) -> float:
        alpha, beta = self._current()
        return alpha * predicted_s + beta


@dataclass(frozen=True, slots=True)
class Verdict:
    """Admission decision for one request."""

    admitted: bool
    predicted_latency_s: float | None = None
    """Predicted latency of this request if queued (None before the service time has been observed), calibrated
    against observed latencies (LatencyCalibration)."""
    model_latency_s: float | None = None
    """The batch model's part of that prediction, before calibration (what LatencyCalibration.observe takes)."""
    retry_after_s: float = 0.0
    """For a rejection: roughly when the backlog will have drained."""
    reason: str = ""

    def retry_after_header(self) -> str:
        """Value of the HTTP Retry-After header (whole seconds, at least 1)."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(slots=True)
class AdmissionControl:
    """Bounded queue plus latency prediction: refuse at once (HTTP 503 + Retry-After) a request that cannot
    make the SLO, instead of queueing it to time out and letting the backlog collapse the replica.

    A new request behind `queue_len` waiting ones is predicted to finish after a full batch now executing and
    the batches ahead of it, each at the fitted high quantile of t(b); it is refused when that exceeds the
    SLO, or when the queue is at `max_queue_len`.
    """

    config: BatchingConfig = field(default_factory=BatchingConfig)
    calibration: LatencyCalibration = field(default_factory=LatencyCalibration)
    """Maps the batch model's prediction to observed latency; the server feeds it (`observe`) per answered
    request. Left unfed (the simulator, where the batch model is the whole server) it is the identity."""

    def check(self, queue_len: int, controller: Controller, waited_s: float = 0.0) -> Verdict:
        """`waited_s`: delay the request has met before reaching this check that the queue does not show (the
        server passes the standing lag of its event loop), added to the prediction."""
        cfg = self.config
        b = controller.settings.max_batch_size
        fit = controller.fit
        raw = fit.drain_time(queue_len + 1, b, cfg.quantile) if fit.ready else None
        pred = self.calibration(raw) + waited_s if raw is not None else None
        if cfg.max_queue_len is not None and queue_len >= cfg.max_queue_len:
            return Verdict(
                False,
                pred,
                raw,
                self.calibration(fit.drain_time(queue_len, b, cfg.quantile)) if fit.ready else 1.0,
                f"queue full ({queue_len} >= {cfg.max_queue_len})",
            )
        if pred is not None and pred > cfg.slo_s:
            return Verdict(
                False,
                pred,
                raw,
                self.calibration(fit.drain_time(queue_len, b, cfg.quantile)),
                f"predicted latency {pred * 1e3:.0f} ms > SLO {cfg.slo_s * 1e3:.0f} ms",
            )
        return Verdict(True, pred, raw)

    def refuses(self, verdict: Verdict, queue_len: int, lag_s: float = 0.0, in_grace: bool = False) -> bool:
        """The liveness rule on top of `check`'s verdict, shared by the replica (serve_app/replica.py) and the
        simulator, so that what the simulator trains and scores is what the replica runs. With nothing queued a
        refusal protects no one, and a replica refusing everything would never observe another batch to correct
        the prediction that made it refuse, so it admits - unless its event loop is far behind (`lag_s`, its
        standing lag, above half the SLO). `in_grace`: just hot-updated (ModelUserConfig.update_grace_s), admits."""
        saturated = lag_s > self.config.slo_s / 2
        return not verdict.admitted and (queue_len > 0 or saturated) and not in_grace
