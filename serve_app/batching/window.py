"""What a replica (or the simulator) records per control window: `WindowRecorder` -> `WindowStats`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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

    def withdrawn(self) -> None:
        """The request just counted by arrival() will not be queued after all (a bad request: its 4xx follows)."""
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
