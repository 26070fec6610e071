"""Batching controllers behind one interface (`Controller`): `Static`, `AIMD`, `SLOModel`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from serve_app.batching.fit import ServiceTimeFit
from serve_app.batching.settings import (
    SERVE_DEFAULT_BATCH_SIZE,
    SERVE_DEFAULT_WAIT_S,
    BatchingConfig,
    BatchSettings,
    _check,
    _is_int,
)
from serve_app.batching.window import WindowStats


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
    itself break the SLO. Wait, when the next batch forms only once the last one returns (`model_blocks_loop`,
    the default; the replica's model queue): 0. It takes what queued while the last one ran, so batch sizes
    follow the load's own fixed point b* = rate * t(b*) - small under light load, larger under heavy load -
    and waiting would only add latency. When the handler awaits the model instead, Ray closes batches while one
    executes, so batches are as large as the wait lets them grow: the wait is the time the (predicted) rate
    needs to fill the smallest batch b with rate * t(b) <= target_utilization * b - 0 under light load, longer
    under heavy load - capped so that it plus 2 * t_q(b) stays within the budget (a wait never breaks the SLO
    by itself).

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
