"""The online service-time model t(b) = a + c*b with a high quantile of its noise (`ServiceTimeFit`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence


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
