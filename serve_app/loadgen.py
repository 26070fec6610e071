"""Open-loop load generator for the Serve app (what `tandem loadtest` runs).

Arrivals are a Poisson process whose rate follows a pattern from serve_app/simulator.py (`Constant`, `Step`, or
`Sine` swinging +-50% around the mean), drawn up front from a seeded RNG, so a request is sent at its time
whether or not earlier ones have been answered (open loop: a slow server faces the same offered load, unlike a
closed loop of N clients that slows down with it). Latency is measured from the scheduled send time, so lag in
the generator itself counts against the server rather than hiding it (coordinated omission). Bounded in requests
(`max_requests`) and time (`duration_s` of arrivals plus `timeout_s` to drain); loopback addresses only.

The report: p50/p95/p99 of answered requests, throughput, goodput (answered within the SLO per second), SLO
attainment (share of all sent requests answered 2xx within the SLO; errors, 503s and timeouts are misses), error
counts by kind, and a per-second timeline, plus an optional PNG of latency and rate over time. Two figures tell a
refusal's cause: how late the generator itself sent (`send_lag_max_ms`: a generator that stalls sends a burst,
which the app then rightly refuses) and which 503s the ingress answered itself (`rejected_by_ingress`: HAProxy
with no replica slot free) rather than a replica's admission control.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import ipaddress
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serve_app.simulator import ArrivalPattern, Constant, poisson_arrivals

LOOPBACK_NAMES = ("localhost",)
INGRESS_503_MARK = b"no replica can take the request now"
"""In the body of the 503 that tandem's HAProxy answers itself (tandem.local_ray._ERROR_503: every replica slot
taken, or none ready); a replica's admission control says why it refused instead."""


@dataclass(kw_only=True, slots=True)
class LoadConfig:
    """One load test."""

    pattern: ArrivalPattern = field(default_factory=lambda: Constant(50.0))
    """Arrival rate over time (serve_app.simulator Constant / Step / Sine)."""
    duration_s: float = 10.0
    """Arrivals stop after this many seconds."""
    max_requests: int = 100_000
    """At most this many requests are sent."""
    timeout_s: float = 2.0
    """A request unanswered after this long counts as a timeout."""
    slo_s: float = 0.1
    """Latency objective for attainment and goodput."""
    route: str = "predict"
    """'predict' (POST /predict) or 'infer' (POST /v2/models/{model}/infer)."""
    model: str = "tandem"
    """Model name for the OIP route and the metadata lookup."""
    instances: int = 1
    """Images per request."""
    seed: int = 0
    """Seed of the arrival times and the request payload."""
    max_connections: int = 1024
    """Connection pool size (an open loop needs one per request in flight)."""

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, ArrivalPattern):
            raise TypeError(f"pattern must be an ArrivalPattern, got {type(self.pattern).__name__}")
        for name in ("duration_s", "timeout_s", "slo_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_requests", "instances", "max_connections"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.route not in ("predict", "infer"):
            raise ValueError(f"route must be 'predict' or 'infer', got {self.route!r}")


def check_loopback(url: str) -> str:
    """`url` without a trailing slash; ValueError unless it is http:// on a loopback address."""
    u = urlparse(url)
    host = u.hostname or ""
    try:
        loop = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = host in LOOPBACK_NAMES
    if u.scheme != "http" or not loop:
        raise ValueError(f"url must be http:// on a loopback address (127.0.0.0/8, ::1, localhost), got {url!r}")
    return url.rstrip("/")


def arrival_times(cfg: LoadConfig) -> list[float]:
    """Send times (seconds from the start) of every request of the test."""
    return poisson_arrivals(cfg.pattern, cfg.duration_s, random.Random(cfg.seed))[: cfg.max_requests]


def request_body(cfg: LoadConfig, input_shape: tuple[int, ...]) -> bytes:
    """One JSON body reused for every request: `instances` random images in [0, 1)."""
    rng = random.Random(cfg.seed)
    n = cfg.instances * math.prod(input_shape)
    flat = [round(rng.random(), 4) for _ in range(n)]
    if cfg.route == "infer":
        shape = [cfg.instances, *input_shape]
        return json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": flat}]}).encode()
    size = math.prod(input_shape)
    return json.dumps({"instances": [flat[i * size : (i + 1) * size] for i in range(cfg.instances)]}).encode()


# --------------------------------------------------------------------------------------------------- report

TIMEOUT, CONN_ERROR = 0, -1
"""Pseudo-statuses of requests that got no HTTP answer."""


@dataclass(kw_only=True, slots=True)
class LoadReport:
    """Outcome of one load test (latencies in ms)."""

    sent: int
    ok: int
    rejected_503: int
    errors: int
    """Answers other than 2xx and 503, plus connection errors."""
    timeouts: int
    duration_s: float
    offered_rps: float
    throughput_rps: float
    """2xx answers per second."""
    goodput_rps: float
    """2xx answers within the SLO per second."""
    slo_s: float
    slo_attainment: float
    """Share of sent requests answered 2xx within the SLO."""
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    status_counts: dict[str, int]
    timeline: list[dict[str, float]]
    """Per second: t, offered (sent), answered (2xx), p99_ms of those answered."""
    rejected_fast: int = 0
    """503s answered within FAST_REFUSAL_S of the request being sent ("refused at once")."""
    rejected_by_ingress: int = 0
    """503s the ingress answered itself (HAProxy, INGRESS_503_MARK), not a replica's admission control."""
    send_lag_p99_ms: float | None = None
    send_lag_max_ms: float | None = None
    """How late the generator sent requests against their schedule (p99, worst); None when not recorded."""
    samples: list[tuple[float, float, int]] = field(default_factory=list, repr=False)
    """(scheduled send time s, latency s, status) per request; not in to_dict()."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        return d

    def summary(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        return (
            f"sent {self.sent} in {self.duration_s:.1f} s (offered {self.offered_rps:.1f}/s): ok {self.ok}, "
            f"503 {self.rejected_503} ({self.rejected_by_ingress} by the ingress), errors {self.errors}, "
            f"timeouts {self.timeouts}; sent up to {ms(self.send_lag_max_ms)} ms late\n"
            f"latency p50 {ms(self.p50_ms)} ms, p95 {ms(self.p95_ms)} ms, p99 {ms(self.p99_ms)} ms; "
            f"throughput {self.throughput_rps:.1f}/s, goodput {self.goodput_rps:.1f}/s, "
            f"within {self.slo_s * 1e3:.0f} ms: {100 * self.slo_attainment:.2f}% of the requests sent "
            f"(goal >= {100 * ATTAINMENT_GOAL:.0f}%: {'met' if self.slo_attainment >= ATTAINMENT_GOAL else 'NOT met'})"
        )


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


ATTAINMENT_GOAL = 0.99
"""Share of requests answered within the SLO that a load test at a sustainable rate should reach (issue 16: `make
demo`'s load test at its default rate); `LoadReport.summary` says whether it was."""
FAST_REFUSAL_S = 0.01
"""A refusal this soon after sending counts as immediate (issue 16: overload refused within 10 ms)."""


def summarize(
    samples: list[tuple[float, float, int]],
    duration_s: float,
    slo_s: float,
    send_lags: list[float] | None = None,
    by_ingress: int = 0,
) -> LoadReport:
    """The report of (scheduled time, latency, status) samples over a run of `duration_s` seconds of arrivals;
    `send_lags`: each send's lag (s) behind its schedule, when recorded; `by_ingress`: 503s the ingress answered."""
    ok = [lat for _, lat, s in samples if 200 <= s < 300]
    good = sum(1 for lat in ok if lat <= slo_s)
    counts: dict[str, int] = {}
    for _, _, s in samples:
        key = {TIMEOUT: "timeout", CONN_ERROR: "connection_error"}.get(s, str(s))
        counts[key] = counts.get(key, 0) + 1
    seconds = max(1, math.ceil(duration_s))
    timeline = []
    for sec in range(seconds):
        in_sec = [(lat, s) for t, lat, s in samples if sec <= t < sec + 1]
        answered = [lat for lat, s in in_sec if 200 <= s < 300]
        p99 = _quantile(answered, 0.99)
        timeline.append(
            {"t": float(sec), "offered": float(len(in_sec)), "answered": float(len(answered)),
             "p99_ms": p99 * 1e3 if p99 is not None else float("nan")}
        )  # fmt: skip
    n = len(samples)
    rejected = counts.get("503", 0)
    timeouts = counts.get("timeout", 0)
    fast = sum(1 for _, lat, s in samples if s == 503 and lat <= FAST_REFUSAL_S)

    def pct(q: float) -> float | None:
        v = _quantile(ok, q)
        return None if v is None else v * 1e3

    return LoadReport(
        sent=n,
        ok=len(ok),
        rejected_503=rejected,
        errors=n - len(ok) - rejected - timeouts,
        timeouts=timeouts,
        duration_s=duration_s,
        offered_rps=n / duration_s,
        throughput_rps=len(ok) / duration_s,
        goodput_rps=good / duration_s,
        slo_s=slo_s,
        slo_attainment=good / n if n else 0.0,
        p50_ms=pct(0.5),
        p95_ms=pct(0.95),
        p99_ms=pct(0.99),
        status_counts=counts,
        timeline=timeline,
        rejected_fast=fast,
        rejected_by_ingress=by_ingress,
        send_lag_p99_ms=None if not send_lags else _quantile(send_lags, 0.99) * 1e3,
        send_lag_max_ms=None if not send_lags else max(send_lags) * 1e3,
        samples=samples,
    )


# ------------------------------------------------------------------------------------------------------ run


async def open_loop(
    times: list[float],
    send: Callable[[], Awaitable[int]],
    timeout_s: float,
    send_lags: list[float] | None = None,
) -> list[tuple[float, float, int]]:
    """Calls `send()` (returning an HTTP status) at each of `times` (seconds from now) whether or not earlier
    calls returned; returns sorted (scheduled time, latency from it, status) samples. A call still pending
    `timeout_s` + 1 s after the last send is cancelled and counted as a timeout. `send_lags`, when given, gets
    how late each call started against its schedule (s): this loop's own stalls."""
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float, int]] = []
    start = loop.time()

    async def one(t: float) -> None:
        if send_lags is not None:
            send_lags.append(max(0.0, loop.time() - start - t))
        try:
            status = await asyncio.wait_for(send(), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):  # cancelled: still pending at the bound
            status = TIMEOUT
        samples.append((t, loop.time() - start - t, status))

    tasks = []
    for t in times:
        delay = start + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(t)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s + 1.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending)
    return sorted(samples)


async def _run(url: str, cfg: LoadConfig, input_shape: tuple[int, ...] | None) -> LoadReport:
    import aiohttp  # a dependency of ray[serve]; far less CPU per request than httpx here

    conn = aiohttp.TCPConnector(limit=cfg.max_connections)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as session:
        if input_shape is None:
            async with session.get(f"{url}/v2/models/{cfg.model}") as r:
                if r.status != 200:
                    raise ValueError(f"{url}/v2/models/{cfg.model} must answer model metadata, got {r.status}")
                input_shape = tuple((await r.json())["inputs"][0]["shape"][1:])
        body = request_body(cfg, input_shape)
        path = f"{url}/predict" if cfg.route == "predict" else f"{url}/v2/models/{cfg.model}/infer"
        headers = {"content-type": "application/json"}

        by_ingress = 0

        async def send() -> int:
            nonlocal by_ingress
            try:
                async with session.post(path, data=body, headers=headers) as r:
                    answer = await r.read()
                    by_ingress += r.status == 503 and INGRESS_503_MARK in answer
                    return r.status
            except asyncio.TimeoutError:  # aiohttp's own timeouts are ClientErrors too
                return TIMEOUT
            except aiohttp.ClientError:
                return CONN_ERROR

        lags: list[float] = []
        with no_collections():
            samples = await open_loop(arrival_times(cfg), send, cfg.timeout_s, lags)
    return summarize(samples, cfg.duration_s, cfg.slo_s, lags, by_ingress)


@contextlib.contextmanager
def no_collections() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (its state before restored after): a generator must
    not stall. A full collection walks the whole heap of the process, which in a Ray driver (`tandem run`'s
    load test, the benchmark before it ran the load in a process of its own) took ~0.3 s, every send scheduled
    meanwhile then going out late, as a burst. The cycles a run leaves are collected after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def generator_process(initializer: Callable[[], object] | None = None) -> concurrent.futures.ProcessPoolExecutor:
    """One process to generate load in, spawned (not forked: the caller may run Ray's threads) and started before
    this returns, so that its start-up never falls inside a timed run. The caller shuts it down (or uses it as a
    context manager). A generator in the caller's process shares its GIL and heap: a stall there sends late, in
    bursts, which count against the server (latency is measured from the scheduled send)."""
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=initializer
    )
    pool.submit(time.sleep, 0).result()
    return pool


def run_load(url: str, cfg: LoadConfig, input_shape: tuple[int, ...] | None = None) -> LoadReport:
    """Runs one open-loop test against the app at `url` (loopback only). `input_shape` (C, H, W) of one image;
    default: read from the app's OIP model metadata."""
    url = check_loopback(url)
    t0 = time.monotonic()
    report = asyncio.run(_run(url, cfg, input_shape))
    assert time.monotonic() - t0 < cfg.duration_s + cfg.timeout_s + 30, "load test overran its bound"
    return report


def run_load_at(url: str, cfg: LoadConfig, start_at: float, input_shape: tuple[int, ...] | None = None) -> LoadReport:
    """`run_load` whose arrivals start at wall-clock time `start_at` (time.time()): for a generator in a process
    of its own (a ProcessPoolExecutor), started in step with what its caller does meanwhile (a hot update), which
    then cannot stall it - a generator thread shares its caller's GIL."""
    time.sleep(max(0.0, start_at - time.time()))
    return run_load(url, cfg, input_shape)


def plot(report: LoadReport, path: str | Path, title: str = "") -> Path:
    """PNG of per-request latency (with the SLO) and offered vs answered rate per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ok = [(t, lat * 1e3) for t, lat, s in report.samples if 200 <= s < 300]
    bad = [(t, lat * 1e3) for t, lat, s in report.samples if not 200 <= s < 300]
    if ok:
        ax1.scatter(*zip(*ok, strict=True), s=2, alpha=0.5, label="2xx")
    if bad:
        ax1.scatter(*zip(*bad, strict=True), s=4, color="red", label="503 / error / timeout")
    ax1.axhline(report.slo_s * 1e3, color="black", linestyle="--", linewidth=1, label="SLO")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax1.legend(loc="upper left", fontsize=8)
    ts = [row["t"] for row in report.timeline]
    ax2.plot(ts, [row["offered"] for row in report.timeline], drawstyle="steps-post", label="offered /s")
    ax2.plot(ts, [row["answered"] for row in report.timeline], drawstyle="steps-post", label="answered 2xx /s")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("requests / s")
    ax2.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or report.summary().splitlines()[1], fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
