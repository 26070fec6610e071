"""Load generator: arrival process, bounds, loopback only, report arithmetic, and a run against a local server."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
import time

import pytest

from serve_app.loadgen import (
    CONN_ERROR,
    TIMEOUT,
    LoadConfig,
    arrival_times,
    check_loopback,
    plot,
    request_body,
    run_load,
    run_load_at,
    summarize,
)
from serve_app.simulator import Constant, Sine, Step
from tandem.local_ray import _ERROR_503


def test_poisson_count_and_bounds():
    times = arrival_times(LoadConfig(pattern=Constant(200.0), duration_s=20.0, seed=1))
    n = len(times)
    assert abs(n - 4000) < 4 * math.sqrt(4000)  # Poisson: sd = sqrt(mean)
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 20.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    cv = (sum((g - 1 / 200) ** 2 for g in gaps) / len(gaps)) ** 0.5 * 200
    assert 0.9 < cv < 1.1  # exponential gaps: coefficient of variation 1 (open loop, not evenly spaced)
    capped = arrival_times(LoadConfig(pattern=Constant(200.0), duration_s=20.0, max_requests=100, seed=1))
    assert capped == times[:100]


def test_sine_and_step_follow_their_rate():
    times = arrival_times(LoadConfig(pattern=Sine(400.0, 0.5, 4.0), duration_s=40.0))
    # peak quarter-periods (rate ~1.45x mean) vs trough ones (~0.55x): ratio ~2.6
    phase = [(t % 4.0) / 4.0 for t in times]
    peak = sum(1 for p in phase if 0.125 <= p < 0.375)
    trough = sum(1 for p in phase if 0.625 <= p < 0.875)
    assert 2.2 < peak / trough < 3.1
    times = arrival_times(LoadConfig(pattern=Step(100.0, 300.0, 5.0), duration_s=10.0))
    before = sum(1 for t in times if t < 5.0)
    assert 2.4 < (len(times) - before) / before < 3.6


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "https://127.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"]
)
def test_only_loopback(url):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(url)


def test_loopback_accepted():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://localhost:1") == "http://localhost:1"
    assert check_loopback("http://[::1]:80") == "http://[::1]:80"


def test_config_checks():
    with pytest.raises(ValueError, match="duration_s"):
        LoadConfig(duration_s=0)
    with pytest.raises(ValueError, match="route"):
        LoadConfig(route="grpc")
    with pytest.raises(TypeError, match="pattern"):
        LoadConfig(pattern="sine")


def test_request_bodies_have_the_model_shape():
    body = json.loads(request_body(LoadConfig(instances=3), (1, 8, 8)))
    assert len(body["instances"]) == 3 and all(len(x) == 64 for x in body["instances"])
    oip = json.loads(request_body(LoadConfig(route="infer", instances=2), (1, 8, 8)))
    (t,) = oip["inputs"]
    assert t["shape"] == [2, 1, 8, 8] and t["datatype"] == "FP32" and len(t["data"]) == 128


def test_summary_arithmetic():
    samples = [(i * 0.01, 0.010 * (i + 1), 200) for i in range(90)]  # latencies 10..900 ms
    samples += [(1.0, 0.001, 503)] * 5 + [(1.5, 2.0, TIMEOUT)] * 3 + [(1.6, 0.002, 500), (1.7, 0.0, CONN_ERROR)]
    r = summarize(samples, duration_s=2.0, slo_s=0.1)
    assert (r.sent, r.ok, r.rejected_503, r.timeouts, r.errors) == (100, 90, 5, 3, 2)
    assert r.slo_attainment == pytest.approx(10 / 100)  # 10 ms .. 100 ms answered within the SLO
    assert r.goodput_rps == pytest.approx(5.0) and r.throughput_rps == pytest.approx(45.0)
    assert r.p50_ms == pytest.approx(450.0) and r.p99_ms == pytest.approx(900.0)
    assert r.status_counts == {"200": 90, "503": 5, "timeout": 3, "500": 1, "connection_error": 1}
    assert [row["offered"] for row in r.timeline] == [90.0, 10.0]
    assert "samples" not in r.to_dict() and json.dumps(r.to_dict(), allow_nan=True)
    assert "within 100 ms: 10.00% of the requests sent (goal >= 99%: NOT met)" in r.summary()
    assert r.send_lag_max_ms is None and "503 5 (0 by the ingress)" in r.summary()
    lagged = summarize(samples, 2.0, 0.1, send_lags=[0.001] * 99 + [0.25], by_ingress=3)
    assert lagged.send_lag_max_ms == pytest.approx(250.0) and lagged.send_lag_p99_ms == pytest.approx(1.0)
    assert "503 5 (3 by the ingress)" in lagged.summary() and "sent up to 250.0 ms late" in lagged.summary()
    good = summarize([(i * 0.01, 0.005, 200) for i in range(99)] + [(1.0, 0.2, 200)], 1.0, 0.1)
    assert "within 100 ms: 99.00% of the requests sent (goal >= 99%: met)" in good.summary()


@pytest.fixture
def toy_server():
    """An aiohttp server on 127.0.0.1 answering like the app: metadata, /predict (every 10th a 503)."""
    from aiohttp import web

    calls = {"n": 0}

    async def metadata(request):
        return web.json_response({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]})

    async def predict(request):
        body = await request.json()
        assert len(body["instances"][0]) == 64
        calls["n"] += 1
        if calls["n"] % 20 == 0:  # as tandem's HAProxy answers itself (tandem.local_ray._ERROR_503)
            return web.Response(body=_ERROR_503, status=503, headers={"Retry-After": "1"})
        if calls["n"] % 10 == 0:  # as a replica's admission control
            return web.json_response({"error": "overloaded: predicted 0.2 s"}, status=503, headers={"Retry-After": "1"})
        await asyncio.sleep(0.002)
        return web.json_response({"classes": [0]})

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v2/models/tandem", metadata)
    app.router.add_post("/predict", predict)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", calls
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_run_against_a_server(toy_server, tmp_path):
    url, calls = toy_server
    cfg = LoadConfig(pattern=Sine(100.0, 0.5, 1.0), duration_s=2.0, timeout_s=2.0, seed=3)
    report = run_load(url, cfg)
    assert report.sent == len(arrival_times(cfg)) == calls["n"]
    assert report.rejected_503 == report.sent // 10 and report.rejected_by_ingress == report.sent // 20
    assert report.ok == report.sent - report.rejected_503 and report.errors == report.timeouts == 0
    assert 0 <= report.send_lag_p99_ms <= report.send_lag_max_ms < 1000
    assert 2.0 <= report.p50_ms <= report.p95_ms <= report.p99_ms < 2000
    png = plot(report, tmp_path / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _hold_the_gil(seconds: float) -> float:
    """Holds this process's GIL for about `seconds` without a break: one C call (the builtin sum over a range)
    that never returns to the interpreter loop, where a waiting thread could take the GIL. Sized by the fastest of
    five timed sums; the hold still came out 0.3 s for 0.4 in some runs, so it returns how long it held."""
    n = 200_000
    per = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        sum(range(n))
        per = min(per, (time.perf_counter() - t0) / n)
    t0 = time.perf_counter()
    sum(range(int(seconds / per)))
    return time.perf_counter() - t0


def test_a_generator_in_its_own_process_is_not_stalled_by_its_caller(toy_server):
    """What bench/serving.py's hot-update section was missing: a load generator in a thread of the process that
    also runs the hot update shares its GIL, so a stall there (Serve's client, here a stand-in that holds the GIL
    0.4 s) delays every send, and the burst that follows is what the app then refuses. In its own process
    (`run_load_at` in a spawned pool, as the bench runs it now) the same stall does not reach it."""
    import concurrent.futures
    import multiprocessing

    url, _ = toy_server
    cfg = LoadConfig(pattern=Constant(100.0), duration_s=1.5, timeout_s=2.0)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(time.sleep, 0).result()  # started before the timed part
        lags, held = {}, {}
        for where in ("process", "thread"):
            start_at = time.time() + 0.3
            if where == "process":
                fut = pool.submit(run_load_at, url, cfg, start_at, (1, 8, 8))
            else:
                fut = concurrent.futures.ThreadPoolExecutor(1).submit(run_load_at, url, cfg, start_at, (1, 8, 8))
            time.sleep(max(0.0, start_at + 0.5 - time.time()))
            # 0.5 s asked: the hold is sized by a timed sum and came out 0.25-0.3 s for 0.4 on a loaded machine
            held[where] = _hold_the_gil(0.5)
            lags[where] = fut.result().send_lag_max_ms
    # The toy server runs in this process too: its answers stall with the GIL, but not the process's sends. A
    # thread's send due early in the hold (100/s: within 100 ms of its start but for e^-10 of runs) waits it out.
    assert held["thread"] >= 0.25 and lags["thread"] >= held["thread"] * 1e3 - 100, (lags, held)
    assert lags["process"] < 150, (lags, held)


def test_tandem_runs_load_test_is_not_stalled_by_its_caller(toy_server, tmp_path):
    """`tandem run`'s load test (serve_app.deploy.run_loadtest, called from the job's driver): the generator runs
    in a process of its own, so the caller holding its GIL for 0.4 s mid-run (as a driver's threads may) does not
    delay a send. Its PNG is written."""
    import concurrent.futures

    from serve_app.deploy import run_loadtest

    url, _ = toy_server
    cfg = LoadConfig(pattern=Constant(100.0), duration_s=3.0, timeout_s=2.0)
    fut = concurrent.futures.ThreadPoolExecutor(1).submit(run_loadtest, url, cfg, str(tmp_path / "lt.png"))
    time.sleep(1.5)  # the generator started (spawn + imports ~1 s) and sending; in this process it would be
    _hold_the_gil(0.4)
    report = fut.result()
    assert report.sent > 200 and report.send_lag_max_ms < 150, report.summary()
    assert (tmp_path / "lt.png").read_bytes()[:4] == b"\x89PNG"


def test_no_garbage_collection_stalls_a_run(toy_server):
    """A full collection of a driver's heap took ~0.3 s (bench/serving.py's sine points collapsed with the
    generator 100-175 ms late): while a run sends, the collector is off (here seen from the server's handler, in
    this process), and after it the collector is as it was before."""
    import gc

    from serve_app.loadgen import no_collections

    url, _ = toy_server
    seen = []
    cfg = LoadConfig(pattern=Constant(200.0), duration_s=0.5, timeout_s=2.0)

    def watch():  # samples the collector's state from another thread while the run sends
        while not done.is_set():
            seen.append(gc.isenabled())
            time.sleep(0.01)

    assert gc.isenabled()
    done = threading.Event()
    watcher = threading.Thread(target=watch)
    time_in_run = time.monotonic()
    watcher.start()
    time.sleep(0.05)  # the watcher sees the collector on before the run
    report = run_load(url, cfg, (1, 8, 8))
    done.set()
    watcher.join()
    assert report.sent > 50 and time.monotonic() - time_in_run > 0.5
    assert seen[0] and seen.count(False) >= 20, seen  # off for the run's ~0.5 s of sends
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collections():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_unanswered_requests_are_connection_errors():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = run_load(f"http://127.0.0.1:{port}", LoadConfig(pattern=Constant(50.0), duration_s=0.5), (1, 8, 8))
    assert report.sent > 0 and report.errors == report.sent and report.slo_attainment == 0


def test_cli_parses_to_configs():
    from tandem.cli_serve import add_parsers, deploy_config, load_config

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loadtest", "--pattern", "sine", "--rate", "120", "--period", "5", "--slo-ms", "50"])
    cfg = load_config(args)
    assert cfg.pattern == Sine(120.0, 0.5, 5.0) and cfg.slo_s == 0.05
    args = parser.parse_args(["loadtest", "--pattern", "step", "--rate", "10", "--duration", "4"])
    assert load_config(args).pattern == Step(10.0, 20.0, 2.0)
    args = parser.parse_args(["serve", "/tmp/a", "--port", "8123", "--canary", "/tmp/b", "--slo-ms", "80"])
    d = deploy_config(args)
    assert d.url == "http://127.0.0.1:8123" and d.app["canary"]["artifact"] == "/tmp/b"
    assert d.app_config("/tmp/a").model_user_config().batching_config().slo_s == 0.08
    # replicas: one per core on the Ray `tandem serve` starts (serve_app.config.one_machine_num_replicas), 1 on a
    # cluster it joins, and what --replicas says wherever it is given
    assert d.replicas_per_core and "num_replicas" not in d.app
    d = deploy_config(parser.parse_args(["serve", "/tmp/a", "--address", "auto"]))
    assert not d.replicas_per_core and d.app_config("/tmp/a").num_replicas == 1
    assert deploy_config(parser.parse_args(["serve", "/tmp/a", "--replicas", "3"])).app["num_replicas"] == 3
    args = parser.parse_args(["serve", "/tmp/a", "--slo-ms", "10"])  # below Serve's 10 ms default wait
    assert deploy_config(args).app_config("/tmp/a").model_user_config().batching_config().max_wait_s == 0.005
