"""The Serve app's metrics, through `ray.util.metrics` so the Ray dashboard and Prometheus see them.

Ray exports them on each node's metrics port with a `ray_` prefix (`ray_tandem_serve_requests_total`, ...).
The metric objects are created on first use, inside the replica, so importing this module needs no running Ray
(and the driver that builds the app never registers them).
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

from serve_app.batching import BatchSettings, WindowStats

PREFIX = "tandem_serve_"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_TAGS = ("deployment", "model")


class ServeMetrics:
    """Every metric of one model deployment; call the methods from the replica as things happen."""

    def __init__(self, deployment: str, model: str) -> None:
        self._tags = {"deployment": deployment, "model": model}
        self._m: dict[str, Any] | None = None
        self._version: str | None = None

    def _metrics(self) -> dict[str, Any]:
        if self._m is None:
            from ray.util import metrics as rm  # first use is inside a Ray worker (a replica)

            m = {
                "latency": rm.Histogram(
                    PREFIX + "request_latency_ms",
                    "End-to-end request latency in the replica (ms).",
                    boundaries=LATENCY_BOUNDARIES_MS,
                    tag_keys=(*_TAGS, "route"),
                ),
                "requests": rm.Counter(
                    PREFIX + "requests",
                    "Requests answered, by route and HTTP status.",
                    tag_keys=(*_TAGS, "route", "status"),
                ),
                "errors": rm.Counter(
                    PREFIX + "errors",
                    "Requests answered with an error (4xx, 5xx, 503 from admission control), by status.",
                    tag_keys=(*_TAGS, "route", "status"),
                ),
                "batch_size": rm.Histogram(
                    PREFIX + "batch_size",
                    "Requests per executed batch.",
                    boundaries=BATCH_BOUNDARIES,
                    tag_keys=_TAGS,
                ),
                "batch_time": rm.Histogram(
                    PREFIX + "batch_service_ms",
                    "Execution time of one batch (ms).",
                    boundaries=LATENCY_BOUNDARIES_MS,
                    tag_keys=_TAGS,
                ),
                "queue": rm.Gauge(PREFIX + "queue_length", "Requests waiting for a batch.", tag_keys=_TAGS),
                "max_batch": rm.Gauge(
                    PREFIX + "max_batch_size",
                    "max_batch_size set by the batching controller.",
                    tag_keys=_TAGS,
                ),
                "wait": rm.Gauge(
                    PREFIX + "batch_wait_timeout_ms",
                    "batch_wait_timeout_s set by the controller (ms).",
                    tag_keys=_TAGS,
                ),
                "version": rm.Gauge(
                    PREFIX + "model_version",
                    "1 for the model version being served, 0 for the one it replaced.",
                    tag_keys=(*_TAGS, "version"),
                ),
                "rss": rm.Gauge(
                    PREFIX + "replica_rss_bytes", "Resident memory of the replica.", tag_keys=_TAGS
                ),
                "cuda": rm.Gauge(
                    PREFIX + "replica_cuda_bytes",
                    "CUDA memory allocated by the replica's tensors, per device.",
                    tag_keys=(*_TAGS, "device"),
                ),
            }
            for metric in m.values():
                metric.set_default_tags(self._tags)
            self._m = m
        return self._m

    def request(self, route: str, status: int, latency_s: float) -> None:
        """One answered request (errors and admission-control 503s included)."""
        m = self._metrics()
        tags = {"route": route, "status": str(status)}
        m["requests"].inc(1, tags)
        if status >= 400:
            m["errors"].inc(1, tags)
        m["latency"].observe(latency_s * 1e3, {"route": route})

    def batch(self, size: int, service_s: float) -> None:
        m = self._metrics()
        m["batch_size"].observe(size)
        m["batch_time"].observe(service_s * 1e3)

    def window(self, stats: WindowStats, settings: BatchSettings) -> None:
        """Once per control window: queue length, the controller's settings, and memory."""
        m = self._metrics()
        m["queue"].set(stats.queue_len)
        m["max_batch"].set(settings.max_batch_size)
        m["wait"].set(settings.batch_wait_timeout_s * 1e3)
        self.memory()

    def model_version(self, version: str) -> None:
        m = self._metrics()
        if self._version is not None and self._version != version:
            m["version"].set(0, {"version": self._version})
        m["version"].set(1, {"version": version})
        self._version = version

    def memory(self) -> None:
        m = self._metrics()
        m["rss"].set(rss_bytes())
        torch = sys.modules.get("torch")  # a replica serving a model has it; never import it just for this
        if torch is not None and torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                m["cuda"].set(torch.cuda.memory_allocated(i), {"device": f"cuda:{i}"})


def rss_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
