"""Admission control: the latency prediction's calibration, the per-request `Verdict` and the liveness rule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.batching.controllers import Controller
from serve_app.batching.settings import (
    BatchingConfig,
    _check,
    _is_int,
)


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
