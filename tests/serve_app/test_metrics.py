"""Serve metrics: importable without Ray; on the node's metrics endpoint once recorded in a worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from serve_app.batching import BatchSettings, WindowStats
from serve_app.metrics import (
    LATENCY_BOUNDARIES_MS,
    METRICS,
    MetricBuffer,
    _LocalHistogram,
    grafana_dashboard,
    rss_bytes,
)


def test_import_and_recording_need_no_ray():
    # recording is plain Python (the replica's event loop makes no ray.util.metrics call); only flush exports
    code = (
        "import sys, serve_app.metrics as m; s = m.ServeMetrics('d', 'm'); s.request('predict', 200, 0.01); "
        "s.batch(4, 0.002); assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_local_histogram_has_prometheus_semantics():
    h = _LocalHistogram((1, 2, 5))
    for v in (0.5, 1.0, 1.5, 2.0, 7.0, 5.0):  # le is inclusive: 1.0 counts under le=1
        h.observe(v)
    assert h.series() == [("1.0", 2), ("2.0", 4), ("5.0", 5), ("+Inf", 6)]
    assert (h.count, h.sum) == (6, 17.0)


class _Recorder:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def inc(self, value, tags):
        self.calls.append(("inc", self.name, value, tags))

    def set(self, value, tags):
        self.calls.append(("set", self.name, value, tags))


def _fake_export(buf: MetricBuffer) -> list:
    calls: list = []
    names = [n + sfx for s in METRICS.values() for n in [s.name]
             for sfx in (("_bucket", "_sum", "_count") if s.kind == "histogram" else ("",))]  # fmt: skip
    buf._ray = {n: _Recorder(n, calls) for n in names}
    return calls


def test_a_flush_sends_each_counter_once_and_unchanged_series_only_when_they_are_due_again():
    buf = MetricBuffer(METRICS, {"deployment": "d", "model": "m"}, refresh_s=20.0)
    calls = _fake_export(buf)
    buf.flush(now=-30.0).result()  # nothing recorded yet: no export thread is started for an empty batch
    assert buf._pool is None
    for _ in range(100):  # 100 requests: one call per counter, one per bucket, not 100 each
        buf.inc("requests", (("route", "predict"), ("status", "200")))
        buf.observe("request_latency_ms", 3.0, (("route", "predict"),))
    buf.set("queue_length", 4)
    buf.flush(now=0.0).result()
    lat = "tandem_serve_request_latency_ms"
    assert ("inc", "tandem_serve_requests", 100, {"route": "predict", "status": "200"}) in calls
    assert ("set", lat + "_count", 100, {"route": "predict"}) in calls
    assert ("set", lat + "_bucket", 0, {"route": "predict", "le": "2.0"}) in calls
    assert ("set", lat + "_bucket", 100, {"route": "predict", "le": "5.0"}) in calls
    assert ("set", "tandem_serve_queue_length", 4, {}) in calls
    assert len(calls) == 1 + len(LATENCY_BOUNDARIES_MS) + 1 + 2 + 1
    calls.clear()
    pool = buf._pool
    buf._pool = None  # a flush that submitted anything would start a new export thread
    buf.flush(now=1.0).result()  # nothing new: nothing sent, nothing submitted
    assert calls == [] and buf._pool is None
    buf._pool = pool
    buf.inc("requests", (("route", "predict"), ("status", "200")), 2)
    buf.set("queue_length", 4)  # same value: not sent
    buf.flush(now=2.0).result()
    assert calls == [("inc", "tandem_serve_requests", 2, {"route": "predict", "status": "200"})]
    calls.clear()
    buf.flush(now=21.0).result()  # due again: every gauge and histogram, so Ray never drops them
    assert ("set", "tandem_serve_queue_length", 4, {}) in calls
    assert ("set", lat + "_count", 100, {"route": "predict"}) in calls
    assert not [c for c in calls if c[0] == "inc"]


def test_rss_is_plausible():
    assert 10 * 2**20 < rss_bytes() < 64 * 2**30


def test_dashboard_covers_every_metric():
    dash = json.loads(json.dumps(grafana_dashboard()))  # plain JSON
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    for spec in METRICS.values():
        exported = "ray_" + spec.name + ("_total" if spec.kind == "counter" else "")
        assert any(exported in e for e in exprs), f"no panel shows {exported}"
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(set(ids)) == len(ids)
    assert all(e.count("(") == e.count(")") for e in exprs)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def value(text: str, name: str, **tags: str) -> float | None:
    """Value of the first sample of `name` whose labels include `tags`."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(labels.get(k) == v for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_reach_the_node_endpoint(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Replica:
        def record(self) -> None:
            from serve_app.metrics import ServeMetrics

            m = ServeMetrics("Model", "tiny")
            m.model_version("v1")
            m.model_version("v2")
            for latency, status in ((0.004, 200), (0.012, 200), (0.030, 200), (0.001, 503), (0.002, 400)):
                m.request("/predict", status, latency)
            m.batch(8, 0.006)
            m.window(WindowStats(duration_s=1.0, arrivals=5, queue_len=3), BatchSettings(24, 0.002))

    replica = Replica.remote()
    ray.get(replica.record.remote())
    port = ray.nodes()[0]["MetricsExportPort"]
    text, deadline = "", time.monotonic() + 40
    tags = {"deployment": "Model", "model": "tiny"}
    while time.monotonic() < deadline:  # Ray exports every ~5-10 s
        text = scrape(port)
        if value(text, "ray_tandem_serve_max_batch_size", **tags) is not None and "ray_tandem_serve_errors" in text:
            break
        time.sleep(1)
    else:
        pytest.fail("tandem metrics did not appear on the metrics endpoint within 40 s")
    assert value(text, "ray_tandem_serve_max_batch_size", **tags) == 24
    assert value(text, "ray_tandem_serve_batch_wait_timeout_ms", **tags) == pytest.approx(2.0)
    assert value(text, "ray_tandem_serve_queue_length", **tags) == 3
    assert value(text, "ray_tandem_serve_requests_total", route="/predict", status="200", **tags) == 3
    assert value(text, "ray_tandem_serve_errors_total", status="503", **tags) == 1
    assert value(text, "ray_tandem_serve_errors_total", status="400", **tags) == 1
    assert value(text, "ray_tandem_serve_errors_total", status="200", **tags) is None
    assert value(text, "ray_tandem_serve_request_latency_ms_count", route="/predict", **tags) == 5
    # latencies 4, 12, 30, 1, 2 ms: cumulative per upper bound, as Prometheus reads a histogram
    lat = "ray_tandem_serve_request_latency_ms_bucket"
    bounds = ("1.0", "2.0", "5.0", "20.0", "30.0", "+Inf")
    got = {le: value(text, lat, route="/predict", le=le, **tags) for le in bounds}
    assert got == {"1.0": 1, "2.0": 2, "5.0": 3, "20.0": 4, "30.0": 5, "+Inf": 5}
    assert value(text, "ray_tandem_serve_request_latency_ms_sum", route="/predict", **tags) == pytest.approx(49.0)
    assert value(text, "ray_tandem_serve_batch_size_count", **tags) == 1
    assert value(text, "ray_tandem_serve_model_version", version="v2", **tags) == 1
    assert value(text, "ray_tandem_serve_model_version", version="v1", **tags) == 0
    assert value(text, "ray_tandem_serve_replica_rss_bytes", **tags) > 10 * 2**20
    ray.kill(replica)
