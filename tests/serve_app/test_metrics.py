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
from serve_app.metrics import METRICS, grafana_dashboard, rss_bytes


def test_import_needs_no_ray():
    code = "import sys, serve_app.metrics as m; m.ServeMetrics('d', 'm'); assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


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
    assert value(text, "ray_tandem_serve_batch_size_count", **tags) == 1
    assert value(text, "ray_tandem_serve_model_version", version="v2", **tags) == 1
    assert value(text, "ray_tandem_serve_model_version", version="v1", **tags) == 0
    assert value(text, "ray_tandem_serve_replica_rss_bytes", **tags) > 10 * 2**20
    ray.kill(replica)
