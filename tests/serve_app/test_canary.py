"""Canary router: the policy without Ray (split, rollback on errors or p99, promotion), then a live canary app whose
split follows its weight, whose broken canary is rolled back automatically with the decision exported, and whose
healthy canary is promoted and then becomes the stable model."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import httpx
import pytest
import torch
from _serve import GOOD, free_port, haproxy_cluster

from serve_app.deploy import DeployConfig, finish_rollout, serve_artifact, update_user_configs
from serve_app.loadgen import LoadConfig, run_load
from serve_app.router import CANARY, PROMOTED, ROLLED_BACK, RUNNING, STABLE, CanaryConfig, CanaryPolicy
from serve_app.simulator import Constant


def feed(policy: CanaryPolicy, n: int, canary_status: int = 200, canary_s: float = 0.01) -> None:
    for _ in range(n):
        side = policy.route()
        policy.record(side, canary_status if side == CANARY else 200, canary_s if side == CANARY else 0.01)


@pytest.mark.parametrize("weight", [0.0, 0.05, 0.3, 0.5, 1.0])
def test_split_carries_the_weight_exactly(weight):
    policy = CanaryPolicy(CanaryConfig(weight=weight), now=0.0)
    sides = [policy.route() for _ in range(1000)]
    assert sides.count(CANARY) == round(1000 * weight)
    first = sides[:20].count(CANARY)  # smooth: every prefix is within one request of the weight
    assert abs(first - 20 * weight) <= 1


def test_config_checks():
    with pytest.raises(ValueError, match="weight"):
        CanaryConfig(weight=1.5)
    with pytest.raises(ValueError, match="unknown"):
        CanaryConfig.from_dict({"wieght": 0.1})
    with pytest.raises(ValueError, match="max_p99_ratio"):
        CanaryConfig(max_p99_ratio=0.5)


def test_errors_roll_back():
    policy = CanaryPolicy(CanaryConfig(weight=0.2, window_s=5.0, min_requests=10), now=0.0)
    feed(policy, 200, canary_status=500)
    assert policy.tick(4.9) is None  # window still open
    d = policy.tick(5.0)
    assert d.state == ROLLED_BACK and "error rate" in d.reason and d.canary["error_rate"] == 1.0
    assert policy.weight == 0.0 and {policy.route() for _ in range(50)} == {STABLE}
    assert policy.tick(100.0) is None  # final


def test_slow_canary_rolls_back_on_p99():
    policy = CanaryPolicy(CanaryConfig(weight=0.5, window_s=1.0, min_requests=10), now=0.0)
    feed(policy, 100, canary_s=0.05)  # 50 ms vs 10 ms: over 1.5 x 10 ms + 5 ms
    d = policy.tick(1.0)
    assert d.state == ROLLED_BACK and "p99" in d.reason


def test_healthy_canary_is_promoted_after_consecutive_windows():
    policy = CanaryPolicy(CanaryConfig(weight=0.5, window_s=1.0, min_requests=10, promote_after=3), now=0.0)
    for w in range(1, 4):
        feed(policy, 100, canary_s=0.012)  # within 1.5 x 10 ms + 5 ms
        d = policy.tick(float(w))
        assert d.state == (PROMOTED if w == 3 else RUNNING)
    assert policy.weight == 1.0 and {policy.route() for _ in range(10)} == {CANARY}


def test_too_few_requests_decide_nothing():
    policy = CanaryPolicy(CanaryConfig(weight=0.1, window_s=1.0, min_requests=20), now=0.0)
    feed(policy, 100, canary_status=500)  # only 10 canary requests
    d = policy.tick(1.0)
    assert d.state == RUNNING and "too few" in d.reason and policy.healthy_windows == 0


def test_grafana_dashboard_file_covers_app_and_canary_metrics():
    import json
    from pathlib import Path

    import serve_app
    from serve_app.metrics import grafana_dashboard

    dash = json.loads((Path(serve_app.__file__).parent / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    generated = [t["expr"] for p in grafana_dashboard()["panels"] for t in p["targets"]]
    assert exprs[: len(generated)] == generated  # the metrics.py dashboard, then the canary panels
    for name in ("canary_state", "canary_weight", "canary_requests_total", "canary_decisions_total"):
        assert any(f"ray_tandem_serve_{name}" in e for e in exprs), name
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# ------------------------------------------------------------------------------------------ the live app


def artifact(path, *, broken: bool = False, seed: int = 0) -> str:
    """An untrained tiny CNN; `broken`: an infinite output bias, so every probability is NaN (a model that
    loads and verifies but is unusable, as a bad quantization could be)."""
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10))
    if broken:
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.bias[0] = float("inf")
    save_artifact(model, path, input_shape=(1, 8, 8))
    return str(path)


@pytest.fixture(scope="module")
def canary_app(_ray_clusters, tmp_path_factory):
    from ray import serve

    haproxy_cluster(_ray_clusters)
    root = tmp_path_factory.mktemp("canary")
    paths = {
        "stable": artifact(root / "stable"),
        "good": artifact(root / "good", seed=1),
        "broken": artifact(root / "broken", broken=True),
    }
    waiting = {"weight": 0.25, "window_s": 600.0, "min_requests": 10_000}  # no decision during the split test
    app = {"version": "s1", "canary": {"artifact": paths["good"], "version": "c1", **waiting}}
    cfg = DeployConfig(port=free_port(), app=app)
    url = serve_artifact(paths["stable"], cfg)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield {"url": url, "cfg": cfg, "paths": paths, "client": client}
    serve.shutdown()


def decide_under_load(canary_app: dict, seconds: float):
    """Runs 30 req/s for `seconds` while polling GET /canary until the router decides; returns (load report,
    the last status)."""
    result = {}
    load = LoadConfig(pattern=Constant(30.0), duration_s=seconds, timeout_s=10.0)
    thread = threading.Thread(target=lambda: result.update(r=run_load(canary_app["url"], load)))
    thread.start()
    deadline, status = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        status = canary_app["client"].get("/canary").json()
        if status["state"] != RUNNING:
            break
        time.sleep(0.25)
    thread.join()
    return result["r"], status


def test_split_follows_the_weight(ray_local, canary_app):
    c = canary_app["client"]
    versions = [c.post("/predict", json=GOOD).json()["version"] for _ in range(200)]
    assert set(versions) == {"s1", "c1"}
    assert abs(versions.count("c1") / 200 - 0.25) <= 0.03
    status = c.get("/canary").json()
    assert status["state"] == RUNNING and status["weight"] == 0.25
    assert c.get("/v2/models/tandem").status_code == 200  # metadata goes to the stable model


def test_failing_canary_is_rolled_back(ray_local, canary_app):
    c, cfg, paths = canary_app["client"], canary_app["cfg"], canary_app["paths"]
    policy = {"weight": 0.5, "window_s": 1.5, "min_requests": 5, "max_error_rate_delta": 0.05}
    canary_user = {"artifact": paths["broken"], "version": "c2", "controller": "slo_model", "batching": {}}
    update_user_configs(paths["stable"], cfg, {"Canary": canary_user, "Router": policy})
    # replicas reconfigure after the controller accepts the config (load + verify + warm up the new artifact): wait
    # until the broken canary answers before the load starts, or a slow machine runs the load against the old one
    deadline, canary_errors = time.monotonic() + 90, 0
    while time.monotonic() < deadline and canary_errors == 0:
        canary_errors += c.post("/predict", json=GOOD).status_code >= 500
    assert canary_errors, "the broken canary never answered"
    report, status = decide_under_load(canary_app, seconds=8.0)
    assert status["state"] == ROLLED_BACK, status
    assert "error rate" in status["decision"]["reason"] and status["weight"] == 0.0
    assert report.errors + canary_errors > 0  # the canary did fail requests before the rollback
    after = [c.post("/predict", json=GOOD) for _ in range(20)]
    assert all(r.status_code == 200 and r.json()["version"] == "s1" for r in after)

    port = ray_local.nodes()[0]["MetricsExportPort"]
    wanted = [
        r'ray_tandem_serve_canary_decisions_total\{[^}]*decision="rolled_back"[^}]*\} 1',
        r"ray_tandem_serve_canary_state\{[^}]*\} -1",
    ]
    deadline, missing = time.monotonic() + 40, wanted
    while missing and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        missing = [w for w in wanted if not re.search(w, text)]
        time.sleep(1)
    assert not missing

    # only now (the state gauge reads -1 until then) end the rollout: the stable model keeps all traffic
    assert finish_rollout(paths["stable"], cfg) == ROLLED_BACK
    status = c.get("/canary").json()
    assert status["state"] == RUNNING and status["weight"] == 0.0  # all traffic to Model until the next canary


def test_healthy_canary_is_promoted_and_becomes_the_stable_model(ray_local, canary_app):
    # After the rollback test: a good canary, judged on errors only (p99 bounds wide: a loaded CI machine makes
    # either side's tail slow at random), promoted after 2 healthy windows; finish_rollout hot-updates Model to it.
    c, cfg, paths = canary_app["client"], canary_app["cfg"], canary_app["paths"]
    policy = {"weight": 0.5, "window_s": 1.5, "min_requests": 5, "promote_after": 2, "max_p99_ratio": 50.0,
              "p99_slack_s": 1.0}  # fmt: skip
    canary_user = {"artifact": paths["good"], "version": "c3", "controller": "slo_model", "batching": {}}
    update_user_configs(paths["stable"], cfg, {"Canary": canary_user, "Router": policy})
    deadline, seen = time.monotonic() + 90, set()
    while time.monotonic() < deadline and "c3" not in seen:  # the canary reconfigured and takes traffic
        seen.add(c.post("/predict", json=GOOD).json().get("version"))
    assert "c3" in seen, seen
    _, status = decide_under_load(canary_app, seconds=10.0)  # ~15 req/s a side: 2 windows in ~3 s
    assert status["state"] == PROMOTED, status
    assert finish_rollout(paths["stable"], cfg) == PROMOTED
    deadline, versions = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # Model reconfigures in place to the canary's artifact
        versions = [c.post("/predict", json=GOOD).json()["version"] for _ in range(20)]
        if set(versions) == {"c3"}:
            break
        time.sleep(0.5)
    assert set(versions) == {"c3"}, versions
    status = c.get("/canary").json()
    assert status["state"] == RUNNING and status["weight"] == 0.0
