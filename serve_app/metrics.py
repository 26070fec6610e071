"""The Serve app's metrics, through `ray.util.metrics` so the Ray dashboard and Prometheus see them.

Ray exports them on each node's metrics port with a `ray_` prefix (`ray_tandem_serve_requests_total`, ...).
The metric objects are created on first use, inside the replica, so importing this module needs no running Ray
(and the driver that builds the app never registers them).
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

from serve_app.batching import BatchSettings, WindowStats

PREFIX = "tandem_serve_"
LATENCY_BOUNDARIES_MS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TAGS = ("deployment", "model")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: str
    """'counter', 'gauge' or 'histogram' (the ray.util.metrics class)."""
    name: str
    """Name as registered; Prometheus sees 'ray_' + name (+ '_total' for counters)."""
    description: str
    tags: tuple[str, ...] = ()
    """Tag keys besides deployment and model."""
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricSpec] = {
    s.name.removeprefix(PREFIX): s
    for s in (
        MetricSpec(
            "histogram",
            PREFIX + "request_latency_ms",
            "Request latency in the replica (ms).",
            ("route",),
            LATENCY_BOUNDARIES_MS,
        ),
        MetricSpec(
            "counter",
            PREFIX + "requests",
            "Requests answered, by route and HTTP status.",
            ("route", "status"),
        ),
        MetricSpec(
            "counter",
            PREFIX + "errors",
            "Requests answered with a 4xx/5xx (admission 503s too).",
            ("route", "status"),
        ),
        MetricSpec("histogram", PREFIX + "batch_size", "Requests per executed batch.", (), BATCH_BOUNDARIES),
        MetricSpec(
            "histogram",
            PREFIX + "batch_service_ms",
            "Execution time of one batch (ms).",
            (),
            LATENCY_BOUNDARIES_MS,
        ),
        MetricSpec("gauge", PREFIX + "queue_length", "Requests admitted and waiting for a batch."),
        MetricSpec("gauge", PREFIX + "max_batch_size", "max_batch_size set by the batching controller."),
        MetricSpec("gauge", PREFIX + "batch_wait_timeout_ms", "batch_wait_timeout_s set by the controller, ms."),
        MetricSpec(
            "gauge",
            PREFIX + "model_version",
            "1 for the version served, 0 for the one it replaced.",
            ("version",),
        ),
        MetricSpec("gauge", PREFIX + "replica_rss_bytes", "Resident memory of the replica process."),
        MetricSpec(
            "gauge",
            PREFIX + "replica_cuda_bytes",
            "CUDA memory allocated by the replica, per device.",
            ("device",),
        ),
    )
}


class ServeMetrics:
    """Every metric of one model deployment; call the methods from the replica as things happen."""

    def __init__(self, deployment: str, model: str) -> None:
        self._tags = {"deployment": deployment, "model": model}
        self._m: dict[str, Any] | None = None
        self._version: str | None = None

    def _metrics(self) -> dict[str, Any]:
        if self._m is None:
            from ray.util import metrics as rm  # first use is inside a Ray worker (a replica)

            m: dict[str, Any] = {}
            for key, spec in METRICS.items():
                tag_keys = (*_TAGS, *spec.tags)
                if spec.kind == "histogram":
                    metric = rm.Histogram(spec.name, spec.description, list(spec.boundaries), tag_keys)
                else:
                    cls = rm.Counter if spec.kind == "counter" else rm.Gauge
                    metric = cls(spec.name, spec.description, tag_keys)
                m[key] = metric.set_default_tags(self._tags)
            self._m = m
        return self._m

    def request(self, route: str, status: int, latency_s: float) -> None:
        """One answered request (errors and admission-control 503s included)."""
        m = self._metrics()
        tags = {"route": route, "status": str(status)}
        m["requests"].inc(1, tags)
        if status >= 400:
            m["errors"].inc(1, tags)
        m["request_latency_ms"].observe(latency_s * 1e3, {"route": route})

    def batch(self, size: int, service_s: float) -> None:
        m = self._metrics()
        m["batch_size"].observe(size)
        m["batch_service_ms"].observe(service_s * 1e3)

    def window(self, stats: WindowStats, settings: BatchSettings) -> None:
        """Once per control window: queue length, the controller's settings, memory, and the model version again
        (Ray 2.60 drops a gauge that is not set for about a minute from its export, so one set per deploy left the
        Grafana panel empty)."""
        m = self._metrics()
        if self._version is not None:
            m["model_version"].set(1, {"version": self._version})
        m["queue_length"].set(stats.queue_len)
        m["max_batch_size"].set(settings.max_batch_size)
        m["batch_wait_timeout_ms"].set(settings.batch_wait_timeout_s * 1e3)
        self.memory()

    def model_version(self, version: str) -> None:
        m = self._metrics()
        if self._version is not None and self._version != version:
            m["model_version"].set(0, {"version": self._version})
        m["model_version"].set(1, {"version": version})
        self._version = version

    def memory(self) -> None:
        m = self._metrics()
        m["replica_rss_bytes"].set(rss_bytes())
        torch = sys.modules.get("torch")  # a replica serving a model has it; never import it just for this
        if torch is not None and torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                m["replica_cuda_bytes"].set(torch.cuda.memory_allocated(i), {"device": f"cuda:{i}"})


def rss_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def grafana_dashboard(title: str = "tandem serve") -> dict[str, Any]:
    """A Grafana dashboard (JSON model) over these metrics, for the Prometheus that scrapes Ray: import it in
    the Grafana that Ray's dashboard integration points at (a `$datasource` variable picks the Prometheus)."""
    sel = '{deployment=~"$deployment"}'
    p = "ray_" + PREFIX

    def q(metric: str, le_by: str = "") -> str:
        return f"sum(rate({p}{metric}_bucket{sel}[1m])) by (le{le_by})"

    panels = [
        (
            "Requests/s by status",
            "reqps",
            [(f"sum(rate({p}requests_total{sel}[1m])) by (status)", "{{status}}")],
        ),
        ("Errors/s by status", "reqps", [(f"sum(rate({p}errors_total{sel}[1m])) by (status)", "{{status}}")]),
        (
            "Request latency (ms)",
            "ms",
            [(f"histogram_quantile({x}, {q('request_latency_ms')})", f"p{round(x * 100)}") for x in (0.5, 0.95, 0.99)],
        ),
        (
            "Batch size",
            "short",
            [
                (f"histogram_quantile(0.5, {q('batch_size')})", "p50"),
                (f"histogram_quantile(0.99, {q('batch_size')})", "p99"),
                (f"sum(rate({p}batch_size_sum{sel}[1m])) / sum(rate({p}batch_size_count{sel}[1m]))", "mean"),
            ],
        ),
        (
            "Batch execution time (ms)",
            "ms",
            [(f"histogram_quantile({x}, {q('batch_service_ms')})", f"p{round(x * 100)}") for x in (0.5, 0.99)],
        ),
        ("Queue length", "short", [(f"max({p}queue_length{sel}) by (deployment)", "{{deployment}}")]),
        (
            "Controller: max_batch_size",
            "short",
            [(f"max({p}max_batch_size{sel}) by (deployment)", "{{deployment}}")],
        ),
        (
            "Controller: batch wait (ms)",
            "ms",
            [(f"max({p}batch_wait_timeout_ms{sel}) by (deployment)", "{{deployment}}")],
        ),
        ("Model version served", "short", [(f"max({p}model_version{sel}) by (version) == 1", "{{version}}")]),
        (
            "Replica memory",
            "bytes",
            [
                (f"sum({p}replica_rss_bytes{sel}) by (deployment)", "RSS {{deployment}}"),
                (f"sum({p}replica_cuda_bytes{sel}) by (deployment, device)", "CUDA {{device}}"),
            ],
        ),
    ]
    ds = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "title": title,
        "uid": "tandem-serve",
        "schemaVersion": 39,
        "time": {"from": "now-15m", "to": "now"},
        "refresh": "5s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
                {
                    "name": "deployment",
                    "type": "query",
                    "datasource": ds,
                    "query": f"label_values({p}requests_total, deployment)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": name,
                "datasource": ds,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + k), "datasource": ds, "expr": expr, "legendFormat": legend}
                    for k, (expr, legend) in enumerate(targets)
                ],
            }
            for i, (name, unit, targets) in enumerate(panels)
        ],
    }
