"""The Serve app's metrics, through `ray.util.metrics` so the Ray dashboard and Prometheus see them.

Ray exports them on each node's metrics port with a `ray_` prefix (`ray_tandem_serve_requests_total`, ...).
The metric objects are created on first use, inside the replica, so importing this module needs no running Ray
(and the driver that builds the app never registers them).

A replica records into a `MetricBuffer` and exports once per control window, from a thread of its own: every
`ray.util.metrics` call releases the GIL in its C++ part and waits to take it back, which costs ~3 us alone but
0.35-1.1 ms with one busy Python thread beside it (measured here), and a replica has three (its event loop,
Serve's HTTP loop, the forward thread). Recorded per request on the event loop, the metrics took ~0.1 ms of the
loop per request and cut saturated throughput by 20-40% (bench/serving.py's wrk points, metrics on vs off).
Buffered, counters cost one call per tag set per window, and a histogram one per bucket per window.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
import os
import resource
import sys
import time
from collections import defaultdict
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


class _LocalHistogram:
    """A histogram kept in the process with Prometheus' semantics: cumulative counts per upper bound (`le`, the
    last one +Inf), sum and count since the process started."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value: le is inclusive
        self.sum += value
        self.count += 1

    def series(self) -> list[tuple[str, float]]:
        """(le, cumulative count) per bound, then +Inf."""
        out, running = [], 0
        for le, n in zip([*(repr(float(b)) for b in self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class MetricBuffer:
    """Counters, gauges and histograms of `specs` recorded in memory (plain Python, no Ray call) and exported to
    `ray.util.metrics` by `flush`, in a thread of its own (module docstring: why). Counters export the increments
    since the last flush; gauges their last value; a histogram exports as gauges `<name>_bucket{le}`, `<name>_sum`
    and `<name>_count` holding its cumulative counts, which is what Prometheus reads of a histogram
    (`histogram_quantile` over `rate(<name>_bucket[1m])`), at one call per bucket per flush instead of one per
    observation (Ray's Histogram has no call that records several). Gauges and histograms are exported again at
    least every `refresh_s` even when unchanged: Ray 2.60 drops a gauge not set for about a minute."""

    def __init__(self, specs: dict[str, MetricSpec], default_tags: dict[str, str], refresh_s: float = 20.0) -> None:
        self._specs = specs
        self._tags = dict(default_tags)
        self._refresh_s = refresh_s
        self._counts: defaultdict[tuple[str, tuple], int] = defaultdict(int)
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._hists: dict[tuple[str, tuple], _LocalHistogram] = {}
        self._exported: dict[tuple[str, tuple], Any] = {}
        """What the last export of each gauge and histogram sent (value; histogram count)."""
        self._last_full = -float("inf")
        self._ray: dict[str, Any] | None = None  # the ray.util.metrics objects, made in the export thread
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def inc(self, key: str, tags: tuple[tuple[str, str], ...] = (), n: int = 1) -> None:
        self._counts[(key, tags)] += n

    def set(self, key: str, value: float, tags: tuple[tuple[str, str], ...] = ()) -> None:
        self._gauges[(key, tags)] = value

    def observe(self, key: str, value: float, tags: tuple[tuple[str, str], ...] = ()) -> None:
        h = self._hists.get((key, tags))
        if h is None:
            h = self._hists[(key, tags)] = _LocalHistogram(self._specs[key].boundaries)
        h.observe(value)

    def flush(self, now: float | None = None) -> concurrent.futures.Future:
        """Hands what changed since the last flush to the export thread; returns its future (tests wait on it),
        done at once when nothing changed and nothing is due."""
        now = time.monotonic() if now is None else now
        full = now - self._last_full >= self._refresh_s
        if full:
            self._last_full = now
        ops: list[tuple[str, str, float, dict[str, str]]] = []  # (method, metric name, value, tags)
        for (key, tags), n in self._counts.items():
            ops.append(("inc", self._specs[key].name, n, dict(tags)))
        self._counts.clear()
        for k, value in self._gauges.items():
            if full or self._exported.get(k) != value:
                self._exported[k] = value
                ops.append(("set", self._specs[k[0]].name, value, dict(k[1])))
        for k, h in self._hists.items():
            if full or self._exported.get(k) != h.count:
                self._exported[k] = h.count
                name, tags = self._specs[k[0]].name, dict(k[1])
                ops += [("set", name + "_bucket", n, {**tags, "le": le}) for le, n in h.series()]
                ops += [("set", name + "_sum", h.sum, tags), ("set", name + "_count", h.count, tags)]
        if not ops:  # nothing to send: no wake-up of the export thread (it would take the replica's GIL)
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            return done
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tandem-metrics")
        done = self._pool.submit(self._export, ops)
        done.add_done_callback(_log_failure)
        return done

    def _export(self, ops: list[tuple[str, str, float, dict[str, str]]]) -> None:
        metrics = self._metrics()
        for method, name, value, tags in ops:
            if method == "inc":
                metrics[name].inc(value, tags)
            else:
                metrics[name].set(value, tags)

    def _metrics(self) -> dict[str, Any]:
        """The ray.util.metrics objects by exported name; a histogram's are three gauges."""
        if self._ray is None:
            from ray.util import metrics as rm  # first use is inside a Ray worker (a replica)

            keys = tuple(self._tags)
            m: dict[str, Any] = {}
            for spec in self._specs.values():
                tag_keys = (*keys, *spec.tags)
                if spec.kind == "counter":
                    m[spec.name] = rm.Counter(spec.name, spec.description, tag_keys)
                elif spec.kind == "gauge":
                    m[spec.name] = rm.Gauge(spec.name, spec.description, tag_keys)
                else:
                    about = spec.description + " Cumulative count per upper bound."
                    m[spec.name + "_bucket"] = rm.Gauge(spec.name + "_bucket", about, (*tag_keys, "le"))
                    m[spec.name + "_sum"] = rm.Gauge(spec.name + "_sum", spec.description + " Sum.", tag_keys)
                    m[spec.name + "_count"] = rm.Gauge(spec.name + "_count", spec.description + " Count.", tag_keys)
            for metric in m.values():
                metric.set_default_tags(self._tags)
            self._ray = m
        return self._ray


def _log_failure(done: concurrent.futures.Future) -> None:
    if done.exception() is not None:
        logging.getLogger("ray.serve").error("exporting metrics failed", exc_info=done.exception())


class ServeMetrics:
    """Every metric of one model deployment; call the methods from the replica as things happen. They record in
    memory; `window` (once per control window) exports (MetricBuffer)."""

    def __init__(self, deployment: str, model: str) -> None:
        self._buf = MetricBuffer(METRICS, {"deployment": deployment, "model": model})
        self._version: str | None = None

    def request(self, route: str, status: int, latency_s: float) -> None:
        """One answered request (errors and admission-control 503s included)."""
        tags = (("route", route), ("status", str(status)))
        self._buf.inc("requests", tags)
        if status >= 400:
            self._buf.inc("errors", tags)
        self._buf.observe("request_latency_ms", latency_s * 1e3, (("route", route),))

    def batch(self, size: int, service_s: float) -> None:
        self._buf.observe("batch_size", size)
        self._buf.observe("batch_service_ms", service_s * 1e3)

    def window(self, stats: WindowStats, settings: BatchSettings) -> concurrent.futures.Future:
        """Once per control window: queue length, the controller's settings, memory, and everything recorded
        since the last window, exported."""
        self._buf.set("queue_length", stats.queue_len)
        self._buf.set("max_batch_size", settings.max_batch_size)
        self._buf.set("batch_wait_timeout_ms", settings.batch_wait_timeout_s * 1e3)
        self.memory()
        return self._buf.flush()

    def model_version(self, version: str) -> None:
        if self._version is not None and self._version != version:
            self._buf.set("model_version", 0, (("version", self._version),))
        self._buf.set("model_version", 1, (("version", version),))
        self._version = version
        self._buf.flush()  # at once: a new version shows before the next window

    def memory(self) -> None:
        self._buf.set("replica_rss_bytes", rss_bytes())
        torch = sys.modules.get("torch")  # a replica serving a model has it; never import it just for this
        if torch is not None and torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self._buf.set("replica_cuda_bytes", torch.cuda.memory_allocated(i), (("device", f"cuda:{i}"),))


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
