"""Serving: adaptive batching (SLOModel, admission control) vs Serve's static `@serve.batch` and no batching (issue 6).

One app on a local Ray (RAY_worker_niceness=0, so the ingress and replica are not at nice 15) with tandem's
default HTTP ingress, HAProxy straight to the replica (`--ingress proxy`: Serve's Python proxy); each variant is a hot
update of the same replica (its user_config), so variants are interleaved run by run on the same process:
  nobatch          no @serve.batch, no admission control
  static_default   @serve.batch with Serve's defaults (10 / 10 ms), no admission control
  static_bN_wM     a small grid of static settings, no admission control (the best one is "best static")
  adaptive         SLOModel controller + admission control (503 + Retry-After) - the default of serve_app
  bandit           (full mode) the Bandit controller + admission control
Open-loop Poisson arrivals from serve_app/loadgen, timeouts counted as misses; CPU used by other processes during
each run is recorded (`other_cpu_cores`; the machines here are shared). Keys (goals from the issue):
  unbatched_capacity_rps                      closed-loop throughput (32 clients) of nobatch over HTTP
  batched_capacity_rps                        the same for static_default and adaptive: their ratio to the
                                              unbatched capacity bounds what any max-rate ratio can reach
  max_rate_ratio_adaptive_vs_static           highest sine mean (+-50%) held at >= 99% within the SLO,
                                              adaptive / static_default                                 >= 1.3
                                              (search_held: the grid, halvings below it for a variant
                                              that fails its lowest rate, two bisections of each bracket;
                                              max_rate_bracket_rps: [held, lowest failed] per variant)
  max_rate_ratio_adaptive_vs_nobatch          same, adaptive / nobatch                                  >= 1.5
  attainment_tight_adaptive_minus_best_static share within 25 ms at 1.0x capacity (constant rate),
                                              adaptive told that SLO (`adaptive_tight`, as `tandem serve
                                              --slo-ms 25` configures it) minus the best static setting >= 0
                                              (the best static chosen on a first round of the grid and
                                              scored beside adaptive on a second round: not the largest
                                              of six noisy medians of the runs that chose it)
  overload_goodput_ratio                      answered within the SLO per second at a 1.5x sine mean,
                                              adaptive / static_default                                 >= 2
  max_rate_ratio_adaptive_vs_static_handle    the max-rate comparison through a DeploymentHandle (no proxy), with
                                              the `resnet18` preset on 8x8 images, where the model's cost
                                              dominates and batching pays (1 thread: t(1) 5 ms,
                                              t(10) 8.7 ms, t(64) 23 ms)                                >= 1.5
  overload_goodput_ratio_bounded              overload_goodput_ratio with adaptive on a deployment with Serve's
                                              proxy-side bound (the first of `--bounds`), interleaved with static
                                              defaults on the unbounded one (redeploys between runs)
  hot_update_lost                             requests lost in a hot update under constant load (0.5x and 0.8x
                                              hot_update_lossless_rate_rps: the highest constant rate adaptive
                                              served in 3 runs without losing a request), unbounded and
                                              at each bound (`--overload-only` runs just these two sections
                                              into serving_overload.json), the load generator in a process of
                                              its own; with the 503s HAProxy answered itself and the
                                              generator's worst send lag per run (`--hot-update-only`: just
                                              this section, generator in its own process and in a thread of
                                              the updating process, into serving_hot_update.json)
  overload_goodput_ratio_handle               overload_goodput_ratio on that handle path at 3x its unbatched
                                              capacity (~1.5x what static batching holds; reported, no goal)
  generator_ceiling_rps                       wrk (C, closed loop, 32 connections) against the ingress's no-op
                                              /-/healthz: what generator + ingress pass with no model
  saturated_ratio_adaptive_vs_static          wrk closed loop at 8/16/32 connections, the most requests/s with
                                              p99 within the SLO, adaptive / static_default              >= 1.3
  saturated_ratio_adaptive_vs_unbatched       same, adaptive / nobatch                                   >= 1.8
  saturated_cost_model                        per request O and per forward A (ms) fitted over the variants'
                                              busiest wrk points (ms/request = O + A / mean batch), wall
                                              and CPU-ms, with the mean batches (the replica's OIP
                                              batch_stats, else each controller's cap)
  saturated_ratio_ceiling_vs_static           the most any batching could serve over static_default under
                                              that model (CPU: all cores at O per request / static's rate)
  haproxy_vs_proxy_saturated_ratio            adaptive's saturated rate through HAProxy / through a fresh Ray
                                              with Serve's Python proxy                                   >= 2.5
  overload_refused_within_10ms_share          share of the 1.5x overload point's 503s answered within 10 ms
  overload_goodput_ratio_at_static_capacity   overload_goodput_ratio at 1.5x static_default's own batched
                                              capacity (where static itself is overloaded), generator in a
                                              process of its own, only at a rate it sustains (p99 send lag
                                              <= 10 ms, else backing off; `--static-overload-only`: just
                                              this point); per variant the share refused within 10 ms
wrk is installed with apt-get when missing. Writes bench/results/serving.json, with `full_run_estimate_s` (the
full protocol's time estimated from this run's).
The protocol (no flags, `python -m bench.serving`): 3 repeats, variants interleaved, medians; 4 s open-loop runs (one
whole sine period each), 5 s closed-loop points, the 0.1x rate grids, each variant climbing a grid only until its
first failing rate (plus the overload point), no redeploys through HAProxy (the proxy-side bound is not applied
there): ~30 minutes on 2 cores. `--bandit` adds the Bandit controller to the max-rate section. `--quick` (one
repeat, coarser rate grids: 0.2x steps) produces every key in about 5 minutes and writes serving_quick.json
instead, a check that never overwrites the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import print_table, write_result
from serve_app.batching.settings import BatchingConfig
from tandem.local_ray import free_port as _free_port

GOALS = {
    "saturated_ratio_adaptive_vs_static": (">=", 1.3),
    "saturated_ratio_adaptive_vs_unbatched": (">=", 1.8),
    "haproxy_vs_proxy_saturated_ratio": (">=", 2.5),
    "max_rate_ratio_adaptive_vs_static": (">=", 1.3),
    "max_rate_ratio_adaptive_vs_nobatch": (">=", 1.8),
    "attainment_tight_adaptive_minus_best_static": (">=", 0.0),
    "overload_goodput_ratio": (">=", 2.0),
    "max_rate_ratio_adaptive_vs_static_handle": (">=", 1.5),
}
SLO_S = 0.1
JSON = {"Content-Type": "application/json"}
"""The app answers 415 to a body of another type (aiohttp's default for bytes is application/octet-stream)."""
TIGHT_S = 0.025
NO_QUEUE_BOUND = {"max_queue_len": None}
VARIANTS = {
    "nobatch": {"controller": "unbatched", "admission": False, "batching": {}},
    "static_default": {"controller": "static", "admission": False, "batching": NO_QUEUE_BOUND},
    "adaptive": {"controller": "slo_model", "admission": True, "batching": {}},
    "bandit": {"controller": "bandit", "admission": True, "batching": {}},
    # adaptive on a deployment with Serve's proxy-side bound (`bounded`): only in the overload section
    "adaptive_bounded": {"controller": "slo_model", "admission": True, "batching": {"max_queue_len": 16}},
    # adaptive told the tight point's SLO, as `tandem serve --slo-ms 25` tells it: the controller's SLO is its one
    # input, and the static grid there is tuned to the point too (its best setting is picked); "adaptive" (the
    # 100 ms default) stays in the choosing round, for comparison
    "adaptive_tight": {"controller": "slo_model", "admission": True, "batching": BatchingConfig.slo_fields(TIGHT_S)},
}
BOUNDS = (16,)  # proxy-side bounds the overload section compares (`--bounds`)
SHAPES = {"tiny": (1, 8, 8), "resnet18": (1, 8, 8)}
UPDATE_TO = "tiny_b"  # a second `tiny` (other weights) that the hot-update section rolls out and back
HANDLE_MODEL = "resnet18"
HTTP_MODEL = "tiny"
"""The model the HTTP sections serve (`--model`): `tiny`, where the per-request HTTP cost dominates, or `resnet18`,
where the forward does and batching pays."""
STATIC_GRID = [(8, 0.002), (16, 0.005), (32, 0.0), (32, 0.01)]
for _b, _w in STATIC_GRID:
    VARIANTS[f"static_b{_b}_w{round(_w * 1e3)}"] = {
        "controller": "static",
        "admission": False,
        "batching": {**NO_QUEUE_BOUND, "initial_batch_size": _b, "initial_wait_s": _w, "max_wait_s": max(_w, 0.05)},
    }


# ------------------------------------------------------------------------------------------ CPU accounting


class CpuMeter:
    """Cores' worth of CPU used during a run by this process tree (driver, Ray, replicas) and by everything
    else on the machine (/proc/stat minus our tree)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def _ours(self) -> float:
        total = 0.0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except self._psutil.Error:
                pass
        return total

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def start(self) -> None:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()

    def stop(self) -> dict[str, float]:
        dt = time.monotonic() - self._t0
        busy, ours = self._busy() - self._busy0, self._ours() - self._ours0
        return {"our_cpu_cores": ours / dt, "other_cpu_cores": max(0.0, busy - ours) / dt}


# ------------------------------------------------------------------------------------------------ the app


def free_port() -> int:
    return _free_port("127.0.0.1")


def make_artifacts(root: Path) -> dict[str, str]:
    """Untrained `tiny` (HTTP runs: the proxy dominates, the model costs ~0.2-0.6 ms) and `resnet18` (handle runs:
    the model dominates) CNNs on 8x8 digits-sized images."""
    import torch

    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    out = {}
    for seed, (name, preset) in enumerate([*((p, p) for p in SHAPES), (UPDATE_TO, "tiny")]):
        torch.manual_seed(seed)
        model = build_model(ModelConfig.preset(preset, in_channels=1, num_classes=10))
        save_artifact(model, root / name, input_shape=SHAPES[preset])
        out[name] = str(root / name)
    return out


class Bench:
    def __init__(self, artifacts: dict[str, str], meter: CpuMeter, ingress: str = "haproxy") -> None:
        from serve_app.deploy import serve_artifact

        self.artifacts = artifacts
        self.meter = meter
        self.proxy_bound = ingress == "proxy"
        """Whether Serve's proxy-side bound (max_queued_requests) exists here: only with the Python proxy (build_app
        does not apply it through HAProxy, which has no proxy queue)."""
        self.cfg = self._config(free_port(), {})
        self.url = serve_artifact(artifacts["tiny"], self.cfg)
        self.model = "tiny"
        self.variant = None
        self.runs: list[dict] = []
        self.app_extra: dict = {}
        self.phase_s: dict[str, float] = {}
        """Wall seconds per section of the protocol (`mark`), for the full protocol's time estimate."""
        self._mark = time.monotonic()
        self.lagged: list[dict] = []
        """HTTP open-loop runs measured again because the generator fell behind its schedule (`http`)."""
        self._pool = None

    def generator(self):
        """The process the HTTP open-loop load is generated in (spawned on first use, at GENERATOR_NICENESS where
        allowed; `close` ends it). Not this process: it runs Ray's driver threads, and its heap (the driver's, the
        runs') makes a full garbage collection here take ~0.3 s; the sine points of the last full run that
        collapsed were exactly those whose generator sent 100-175 ms late (p99), in every variant alike."""
        from serve_app.loadgen import generator_process

        if self._pool is None:
            self._pool = generator_process(generator_priority)
            self.generator_niceness = self._pool.submit(os.nice, 0).result()
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def mark(self, phase: str) -> None:
        """Books the wall time since the last mark (or the deploy) to `phase`."""
        now = time.monotonic()
        self.phase_s[phase] = self.phase_s.get(phase, 0.0) + now - self._mark
        self._mark = now

    @staticmethod
    def _config(port: int, app_extra: dict):
        """The deploy config of the protocol's app: the `tiny` version at REPLICAS replicas, plus `app_extra`."""
        from serve_app.deploy import DeployConfig

        return DeployConfig(port=port, app={"version": "tiny", "num_replicas": REPLICAS, **app_extra})

    def redeploy(self, app_extra: dict) -> None:
        """Re-applies the app with other args (deployment options such as max_queued_requests): the replica
        restarts; a no-op when they are the current ones."""
        from serve_app.deploy import serve_artifact

        if app_extra == self.app_extra:
            return
        self.cfg = self._config(self.cfg.port, app_extra)
        self.url = serve_artifact(self.artifacts["tiny"], self.cfg)
        self.app_extra, self.variant, self.model = dict(app_extra), None, "tiny"

    def bounded(self, queued: int) -> dict:
        """App args of a deployment with Serve's proxy-side bound at `queued` (module `bounded`); none through
        HAProxy, where the bound is not applied: re-deploying for it only restarted the replica (two start-ups per
        repeat, each planning the fp32 form: minutes of the protocol) to serve the same thing. The replica-side
        queue bound of `adaptive_bounded` is its user_config and needs no redeploy."""
        return bounded(queued) if self.proxy_bound else {}

    def use(self, variant: str, model: str | None = None, roll_out: bool = False, settle: bool = True) -> None:
        """Switches the replicas to `variant` (and `model`) in place, then lets them settle for a window.
        `roll_out`: through serve_app.deploy.roll_out (lifts the proxy-side bound for the update), not a plain
        re-apply of the config. `settle` (before a run; not for an update inside one, which the run measures):
        also waits until every replica serves it and, through HAProxy, until HAProxy has applied the target
        changes the update made (`_settled`)."""
        from dataclasses import asdict

        import httpx

        from serve_app.config import ModelUserConfig
        from serve_app.deploy import roll_out as bound_safe_update
        from serve_app.deploy import update_user_configs

        model = model or self.model
        if (variant, model) == (self.variant, self.model):
            return
        user = {"artifact": self.artifacts[model], "version": model, **VARIANTS[variant]}
        t_update = time.monotonic()
        (bound_safe_update if roll_out else update_user_configs)(self.artifacts["tiny"], self.cfg, {"Model": user})
        applied = asdict(ModelUserConfig.from_dict(user))  # what the replica reports, defaults filled in
        deadline = time.monotonic() + 60
        while True:
            # A bounded proxy may answer 503 under load, and a replica still draining the last run's backlog on a
            # loaded machine may not answer within 10 s (seen twice at load ~13): ask again until the deadline.
            try:
                r = httpx.get(f"{self.url}/v2/models/tandem", timeout=10)
            except httpx.TimeoutException:
                r = None
            if r is not None and r.status_code == 200 and r.json()["parameters"]["user_config"] == applied:
                break
            assert time.monotonic() < deadline, f"replica did not switch to {variant}/{model}"
            time.sleep(0.2)
        self.variant, self.model = variant, model
        if settle:
            self._settled(user, t_update)
        time.sleep(1.0)

    def _settled(self, user: dict, t_update: float) -> None:
        """Returns once every replica serves `user` and, through HAProxy, HAProxy has applied the target changes
        of the update started at `t_update` (time.monotonic()). Before, a run could start while:
        - a second replica still loaded or warmed up: the GET above is answered by whichever replica HAProxy
          picks, and with several the node's turn (ModelServer._prepare_in_turn) loads them one after another;
        - HAProxy reloaded: the update takes the replicas out of the controller's running set for a moment, and
          HAProxy applies that change HAPROXY_COALESCE_S after it, with a new HAProxy process (0.6 s from the
          change's arrival to the reload's end in the manager's log, 2 cores), inside the next run's first
          second."""
        from serve_app.deploy import wait_served
        from tandem.local_ray import HAPROXY_COALESCE_S

        wait_served(self.cfg, "Model", user, timeout_s=60)
        if not self.proxy_bound:  # through HAProxy
            time.sleep(max(0.0, t_update + HAPROXY_COALESCE_S + 1.0 - time.monotonic()))

    def http(self, variant: str, pattern, duration_s: float, slo_s: float = SLO_S, tag: str = "") -> dict:
        """One open-loop run over HTTP from the generator's process. A run whose generator sent later than
        GENERATOR_LAG_BOUND_MS (p99) did not offer the load it scheduled (its stall comes back as a burst, which
        HAProxy's per-replica cap refuses): it is kept in `lagged`, not in `runs`, and measured again, up to
        GENERATOR_RERUNS times; the last try counts whatever its lag (its row says so)."""
        from serve_app.loadgen import LoadConfig, run_load_at

        self.use(variant, HTTP_MODEL)
        load = LoadConfig(pattern=pattern, duration_s=duration_s, timeout_s=2.0, slo_s=slo_s)
        for attempt in range(GENERATOR_RERUNS + 1):
            self.meter.start()
            r = self.generator().submit(run_load_at, self.url, load, time.time() + 0.2, SHAPES[HTTP_MODEL]).result()
            row = self._record(variant, "http", tag, pattern, r)
            row["generator_sustained"] = (r.send_lag_p99_ms or 0.0) <= GENERATOR_LAG_BOUND_MS
            if row["generator_sustained"] or attempt == GENERATOR_RERUNS:
                return row
            self.lagged.append(self.runs.pop())
            print(f"  generator {r.send_lag_p99_ms:.1f} ms late (p99): measured again", flush=True)
        raise AssertionError("unreachable")

    def handle(self, variant: str, pattern, duration_s: float, tag: str = "") -> dict:
        from ray import serve

        from serve_app.loadgen import LoadConfig, arrival_times, no_collections, open_loop, request_body, summarize
        from serve_app.routes import Call

        self.use(variant, HANDLE_MODEL)
        cfg = LoadConfig(pattern=pattern, duration_s=duration_s, timeout_s=2.0, slo_s=SLO_S)
        body = request_body(cfg, SHAPES[HANDLE_MODEL])
        h = serve.get_app_handle(self.cfg.app_name)

        async def send() -> int:
            return (await h.respond.remote(Call("predict", body))).status

        # The handle's calls go through this process's Ray driver, so the load is generated here (not in
        # `generator`'s process); its send lag is recorded and the collector is off while it sends.
        self.meter.start()
        lags: list[float] = []
        with no_collections():
            samples = asyncio.run(open_loop(arrival_times(cfg), send, cfg.timeout_s, lags))
        return self._record(variant, "handle", tag, pattern, summarize(samples, duration_s, SLO_S, lags))

    def _record(self, variant, path, tag, pattern, report) -> dict:
        row = {"variant": variant, "path": path, "tag": tag, "pattern": repr(pattern), **self.meter.stop()}
        row.update({k: v for k, v in report.to_dict().items() if k not in ("timeline", "status_counts")})
        self.runs.append(row)
        print(
            f"  {path:6s} {variant:16s} {tag:10s} offered {report.offered_rps:6.1f}/s  ok {report.ok:5d}  "
            f"503 {report.rejected_503:4d}  to {report.timeouts:4d}  p99 {report.p99_ms or float('nan'):7.1f} ms  "
            f"attain {report.slo_attainment:.3f}  other cpu {row['other_cpu_cores']:.2f}",
            flush=True,
        )
        return row

    def closed_loop_capacity(self, variant: str, path: str, seconds: float, clients: int = 32) -> float:
        """Requests/s answered by `clients` back-to-back callers: the saturated throughput. Raises when none was
        answered 200 (a capacity of 0 is a broken run, not a measurement)."""
        import aiohttp
        from ray import serve

        from serve_app.loadgen import LoadConfig, request_body

        model = HTTP_MODEL if path == "http" else HANDLE_MODEL
        self.use(variant, model)
        from serve_app.routes import Call

        body = request_body(LoadConfig(), SHAPES[model])
        h = serve.get_app_handle(self.cfg.app_name)

        async def run() -> int:
            done = 0
            async with aiohttp.ClientSession() as session:
                # Warm-up outside the timed part: the first handle call sets up the driver's router and the first
                # HTTP requests open connections.
                for _ in range(5):
                    if path == "http":
                        async with session.post(f"{self.url}/predict", data=body, headers=JSON) as r:
                            await r.read()
                    else:
                        await h.respond.remote(Call("predict", body))
                stop = time.monotonic() + seconds

                async def client() -> None:
                    nonlocal done
                    while time.monotonic() < stop:
                        if path == "http":
                            async with session.post(f"{self.url}/predict", data=body, headers=JSON) as r:
                                await r.read()
                                done += r.status == 200
                        else:
                            # Await first, then add: `done += (await ...)` reads `done` before the await, so
                            # the 32 clients overwrote each other's counts (13.7/s measured for ~450/s served).
                            reply = await h.respond.remote(Call("predict", body))
                            done += reply.status == 200

                await asyncio.gather(*(client() for _ in range(clients)))
            return done

        done = asyncio.run(run())
        if done == 0:
            raise RuntimeError(f"{variant} over {path}: no request answered 200 in {seconds} s")
        return done / seconds


# ------------------------------------------------------------------------------------------------ wrk

WRK_CONNECTIONS = (8, 16, 32)
"""Closed-loop points (connections) of the saturated comparison; the busiest one within the SLO counts."""


def ensure_wrk() -> str:
    """Path of `wrk` (Debian's C HTTP load generator), installed with apt-get when missing: a closed loop that
    does not spend the cores it measures on a Python client."""
    found = shutil.which("wrk")
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk must be installed (apt-get install -y wrk)")
    return found


def wrk(url: str, seconds: float, connections: int, body: bytes | None = None) -> dict[str, float]:
    """One closed-loop point: `connections` back-to-back clients for `seconds` (2 threads). POSTs `body` as JSON
    when given, else GETs. Returns rps (all answers), p99_ms (wrk's latency distribution) and non2xx."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [ensure_wrk(), "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
        if body is not None:
            script = Path(tmp) / "post.lua"
            script.write_text(
                'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(body.decode())}\n"
            )
            cmd[1:1] = ["-s", str(script)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    p99 = float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]] if m else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": rps, "p99_ms": p99, "non2xx": int(bad[1]) if bad else 0, "connections": connections}


def saturated(bench: Bench, variants: list[str], seconds: float, repeats: int) -> dict[str, dict]:
    """Per variant: the highest wrk closed-loop throughput (requests/s, all 200) among WRK_CONNECTIONS whose p99
    stays within the SLO (0 when none does), medians over `repeats`, variants interleaved. Also, at each repeat's
    fastest point whatever its p99 (the saturated throughput: static defaults peaked at 16 connections, not 32):
    the median requests/s (`peak_rps`), the replica's mean batch there (`mean_batch`: `replica_batch_stats`;
    None where the replica does not count its batches, and then `batch_cap`, the controller's max_batch_size
    after the point, capped at the point's connections) and the cores our process tree used there
    (`peak_cpu_cores`: wrk, HAProxy, Ray, the replica), the input of `saturated_cost_model`."""
    from serve_app.loadgen import LoadConfig, request_body

    body = request_body(LoadConfig(), SHAPES[HTTP_MODEL])
    points: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for v in variants:
            bench.use(v, HTTP_MODEL)
            for c in WRK_CONNECTIONS:
                before = replica_batch_stats(bench.url)
                bench.meter.start()
                r = wrk(f"{bench.url}/predict", seconds, c, body)
                r.update(bench.meter.stop())  # cores used by our tree (wrk included) and by the rest
                after = replica_batch_stats(bench.url)
                r["mean_batch"] = mean_batch_between(before, after)
                cap = (after or {}).get("max_batch_size")
                r["batch_cap"] = min(cap, c) if cap else None
                points.setdefault(v, []).append(r)
                extra = f"  mean batch {r['mean_batch']:.1f}" if r["mean_batch"] else ""
                print(f"  wrk {v:16s} c={c:2d}  {r['rps']:7.1f}/s  p99 {r['p99_ms']:6.1f} ms  non2xx {r['non2xx']}"
                      f"  cpu {r['our_cpu_cores']:.2f}{extra}")  # fmt: skip
    out = {}
    for v, rs in points.items():
        held, peaks = [], []
        for i in range(repeats):
            run = rs[i * len(WRK_CONNECTIONS) : (i + 1) * len(WRK_CONNECTIONS)]
            ok = [r["rps"] for r in run if r["p99_ms"] <= SLO_S * 1e3 and r["non2xx"] == 0]
            held.append(max(ok, default=0.0))
            peaks.append(max(run, key=lambda r: r["rps"]))

        def med(k: str, xs: list[dict] = peaks) -> float | None:
            vals = [r[k] for r in xs if r.get(k)]
            return statistics.median(vals) if vals else None

        out[v] = {
            "rps_within_slo": statistics.median(held),
            "peak_rps": med("rps"),
            "peak_connections": med("connections"),
            "peak_cpu_cores": med("our_cpu_cores"),
            "peak_other_cpu_cores": med("other_cpu_cores"),
            "mean_batch": med("mean_batch") if all(r.get("mean_batch") for r in peaks) else None,
            "batch_cap": med("batch_cap"),
            "points": rs,
        }
    return out


def replica_batch_stats(url: str) -> dict | None:
    """The replica's batch counters from the OIP statistics extension (`batch_stats`: executions per batch size,
    Triton's form) and its controller's max_batch_size (model metadata); None when it does not answer."""
    import httpx

    try:
        stats = httpx.get(f"{url}/v2/models/tandem/stats", timeout=10).json()["model_stats"][0]
        meta = httpx.get(f"{url}/v2/models/tandem", timeout=10).json()["parameters"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None
    counts = {}
    for row in stats.get("batch_stats") or []:
        counts[int(row["batch_size"])] = int(row.get("compute_infer", {}).get("count", 0))
    unbatched = meta.get("controller") == "unbatched"
    cap = 1 if unbatched else (meta.get("batch_settings") or {}).get("max_batch_size")
    return {"batches": counts, "max_batch_size": cap}


def mean_batch_between(before: dict | None, after: dict | None) -> float | None:
    """Mean executed batch size between two `replica_batch_stats` readings (requests / executions of the
    forward); None without both readings or with no batch counted in between."""
    if not before or not after:
        return None
    sizes = set(before["batches"]) | set(after["batches"])
    delta = {n: after["batches"].get(n, 0) - before["batches"].get(n, 0) for n in sizes}
    runs = sum(c for c in delta.values() if c > 0)
    return sum(n * c for n, c in delta.items() if c > 0) / runs if runs else None


def fit_cost_model(points: dict[str, tuple[float, float]], static: str = "static_default") -> dict | None:
    """Least squares over the variants' saturated points {variant: (ms per request, mean batch)} of the model
    "each request costs O (client, ingress, route: it does not batch) and each forward A":
    ms per request = O + A / mean_batch. Returns per_request_ms (O), per_forward_ms (A), mean_batch, the
    measured and fitted ms per request, and `ratio_ceiling_vs_static`: an infinitely large batch's rate over
    `static`'s under the model, (O + A / b_static) / O, the most any batching policy could gain on it (None when
    O <= 0: then the data do not fit the model). None with fewer than two distinct batch sizes."""
    pts = {v: (ms, b) for v, (ms, b) in points.items() if ms and ms > 0 and b and b >= 1}
    if len({b for _, b in pts.values()}) < 2:
        return None
    xs = {v: 1.0 / b for v, (_, b) in pts.items()}
    ys = {v: ms for v, (ms, _) in pts.items()}
    mx, my = statistics.fmean(xs.values()), statistics.fmean(ys.values())
    a = sum((xs[v] - mx) * (ys[v] - my) for v in pts) / sum((x - mx) ** 2 for x in xs.values())
    o = my - a * mx
    fitted = {v: o + a * xs[v] for v in pts}
    return {
        "per_request_ms": o,
        "per_forward_ms": a,
        "mean_batch": {v: b for v, (_, b) in pts.items()},
        "ms_per_request": ys,
        "fitted_ms_per_request": fitted,
        "ratio_ceiling_vs_static": fitted[static] / o if static in pts and o > 0 else None,
    }


def saturated_cost_model(sat: dict[str, dict], cores: float | None = None) -> tuple[dict | None, float | None]:
    """The `saturated` section's cost model, two ways, and the ceiling of saturated_ratio_adaptive_vs_static.

    Batch sizes: the replica's measured means where it counts batches (every variant fitted); else only the
    variants whose batch size their configuration fixes at saturation, nobatch (1) and the static ones (their
    max_batch_size, capped at the point's connections: `batch_cap`), since an adaptive controller's cap says
    little about the batches it ran (a quick run with caps had adaptive paying more CPU per request than static,
    so its batches were far under its cap of 32); `mean_batch_source` says which. `below_floor`: the variants
    measured cheaper per request than O, which the model says none can be (a contradiction of the model).
    - wall: ms per request = 1000 / peak rps. Its ceiling (O + A/b_static) / O holds only if every variant keeps
      the cores busy; a variant that leaves them idle (a batch wait with too few requests) is slow for another
      reason, and a measured ratio above this ceiling says so.
    - cpu: CPU-ms per request = cores used by our tree * 1000 / peak rps: what the machine pays, idle time
      excluded. Its ceiling: `cores` (default: the most any variant kept busy, what the tree was seen to get on
      this machine at that time) at O per request over static's measured peak.
    O is whatever a request costs that batching does not share: the HTTP path, and the model's per-sample
    compute where the forward's time grows with the batch (resnet18); A the fixed cost of one forward.
    Returns the model dict and the headline ceiling (cpu where the cores were recorded, else wall)."""
    measured = all(x.get("mean_batch") for x in sat.values())
    fixed = [v for v in sat if v == "nobatch" or v.startswith("static")]
    fit = list(sat) if measured else fixed
    batch = {v: sat[v]["mean_batch"] if measured else sat[v].get("batch_cap") or 1 for v in fit}

    def per_request(v: str, cpu: bool) -> float:
        x = sat[v]
        return (x["peak_cpu_cores"] if cpu else 1.0) * 1e3 / x["peak_rps"] if x["peak_rps"] else 0.0

    wall = fit_cost_model({v: (per_request(v, False), batch[v]) for v in fit})
    if wall is None:
        return None, None
    cpu = None
    if all(x.get("peak_cpu_cores") for x in sat.values()):
        cpu = fit_cost_model({v: (per_request(v, True), batch[v]) for v in fit})
    for f, on_cpu in ((wall, False), (cpu, True)):
        if f is not None:
            f["measured_ms_per_request_all"] = {v: per_request(v, on_cpu) for v in sat}
            f["below_floor"] = [v for v in sat if per_request(v, on_cpu) < f["per_request_ms"]]
    if cpu is not None:
        cores = cores or max(x["peak_cpu_cores"] for x in sat.values())
        o, static = cpu["per_request_ms"], sat.get("static_default", {}).get("peak_rps")
        cpu["ratio_ceiling_vs_static"] = cores * 1e3 / o / static if o > 0 and static else None
        cpu["cores"] = cores
        cpu["cpu_cores_used"] = {v: x["peak_cpu_cores"] for v, x in sat.items()}
    model = {
        "per_request_ms": wall["per_request_ms"],
        "per_forward_ms": wall["per_forward_ms"],
        "mean_batch": wall["mean_batch"],
        "mean_batch_source": "replica batch_stats" if measured else "configuration (nobatch, static caps)",
        "wall": wall,
        "cpu": cpu,
        "ceiling_basis": "cpu" if cpu is not None else "wall",
    }
    return model, (cpu or wall)["ratio_ceiling_vs_static"]


def generator_ceiling(url: str, seconds: float) -> float:
    """wrk's requests/s at 32 connections against the ingress's no-op health endpoint (answered by HAProxy
    itself, or by the proxy): what the generator and the ingress pass with no model behind them."""
    return wrk(f"{url}/-/healthz", seconds, 32)["rps"]


# ------------------------------------------------------------------------------------------------ protocol


DESCEND_STEPS = 4
"""How far `search_held` looks below the grid for a variant that fails its lowest rate: halving that rate up to
this many times (down to 1/16 of it)."""
REFINE_STEPS = 2
"""Bisections of the bracket [highest rate held, lowest failed] per variant after the grid (2: a 0.5x grid step
becomes 0.125x; 0.1x steps 0.025x). With 1, the handle path read static and adaptive as [0.75x, 1.0x) and
[1.0x, 1.25x): a ratio anywhere between 1.0 and 1.67 came out as 1.333."""


def held_brackets(held: dict[str, float], runs: dict[tuple[str, float], list[dict]], cap: float) -> dict:
    """Per variant [rate held, lowest rate run above it] (requests/s; None above: nothing above was run): the
    resolution of each max-rate figure, from the runs `max_rate_held` returned."""
    out = {}
    for v, rps in held.items():
        above = [m * cap for (u, m) in runs if u == v and m * cap > rps + 1e-9]
        out[v] = [rps, min(above) if above else None]
    return out


def max_rate_held(
    bench: Bench,
    variants: list[str],
    cap: float,
    mults: list[float],
    repeats: int,
    dur: float,
    path: str,
    period_s: float,
    always: float | None = None,
    descend: int = DESCEND_STEPS,
    refine: int = REFINE_STEPS,
) -> tuple[dict[str, float], dict[tuple[str, float], list[dict]]]:
    """Highest sine mean (requests/s; `mults` in multiples of `cap`) whose median attainment over `repeats` is
    >= 99%, per variant, found by `search_held` (the grid, then below it and between the grid's points); variants
    interleaved at each step. Also returns the runs by (variant, multiple)."""
    from serve_app.simulator import Sine

    run = bench.http if path == "http" else bench.handle

    def measure(v: str, m: float) -> dict:
        return run(v, Sine(m * cap, 0.5, period_s), dur, tag=f"sine {m:.2f}x")

    held, runs = search_held(variants, mults, measure, repeats, always, descend, refine)
    return {v: m * cap for v, m in held.items()}, runs


def attains_slo(rows: list[dict]) -> bool:
    """A rate is held when the median attainment of its runs is >= 99% (`search_held`'s default)."""
    return statistics.median(r["slo_attainment"] for r in rows) >= 0.99


def loses_nothing(rows: list[dict]) -> bool:
    """A rate is held when every one of its runs answered every request it sent 200."""
    return all(r["sent"] == r["ok"] for r in rows)


def search_held(
    variants: list[str],
    mults: list[float],
    measure: Callable[[str, float], dict],
    repeats: int,
    always: float | None = None,
    descend: int = DESCEND_STEPS,
    refine: int = REFINE_STEPS,
    holds: Callable[[list[dict]], bool] | None = None,
) -> tuple[dict[str, float], dict[tuple[str, float], list[dict]]]:
    """Highest rate (a multiple, as `mults`) that each variant holds: `holds(its repeats' rows)`, by default median
    `slo_attainment` of `measure(variant, multiple)` over `repeats` >= 99%. Every step runs the variants it
    concerns interleaved (repeat by repeat), each at its own rate. Returns the held multiple per variant (0.0 only
    if it held nothing down to the lowest rate tried) and the runs by (variant, multiple).

    1. The grid, climbing: a rate is held up to the first one that fails (a lucky pass above a failure is noise,
       not capacity), so a variant that failed is not run at higher rates, except at `always` (the overload point
       every variant runs).
    2. Below the grid: a variant that failed the lowest rate is run at half of it, a quarter, ... (`descend`
       halvings) until it holds one: a ratio of held rates is then always a number, not "n/a" because the grid
       started above what one variant holds (the handle path's static defaults held nothing on a grid from 1x).
    3. Between: `refine` bisections of each variant's bracket (highest held, lowest failed), so that two variants
       one grid step apart are not read as a whole step apart."""
    for name, v in (("repeats", repeats), ("descend", descend), ("refine", refine)):
        if not isinstance(v, int) or v < (1 if name == "repeats" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'repeats' else 0}, got {v!r}")
    if not mults or any(m <= 0 for m in mults) or list(mults) != sorted(mults):
        raise ValueError(f"mults must be ascending positive multiples, got {mults!r}")
    runs: dict[tuple[str, float], list[dict]] = {}

    def step(plan: dict[str, float]) -> dict[str, bool]:
        """Runs each variant of `plan` at its multiple, interleaved; whether each held it."""
        for _ in range(repeats):
            for v, m in plan.items():
                runs.setdefault((v, m), []).append(measure(v, m))
        return {v: (holds or attains_slo)(runs[(v, m)][-repeats:]) for v, m in plan.items()}

    held = dict.fromkeys(variants, 0.0)
    failed: dict[str, float] = {}  # lowest multiple a variant failed at
    climbing = list(variants)
    for m in mults:
        now = list(variants) if m == always else climbing
        if not now:
            continue  # `always` may still lie above
        ok = step(dict.fromkeys(now, m))
        for v in list(climbing):
            if ok[v]:
                held[v] = m
            else:
                climbing.remove(v)
                failed[v] = m
    low = mults[0]
    for _ in range(descend):
        below = [v for v in variants if held[v] == 0.0]
        if not below:
            break
        low /= 2
        for v, ok in step(dict.fromkeys(below, low)).items():
            if ok:
                held[v] = low
            else:
                failed[v] = low
    for _ in range(refine):
        plan = {v: (held[v] + failed[v]) / 2 for v in variants if held[v] > 0 and v in failed}
        if not plan:
            break
        for v, ok in step(plan).items():
            if ok:
                held[v] = plan[v]
            else:
                failed[v] = plan[v]
    return held, runs


REPLICA_QUEUE = 16  # the bounded deployments' replica-side max_queue_len (`--replica-queue`)
REPLICAS = 1
"""Model replicas of every deployment the protocol measures (`--replicas`): 1, so that the controllers are compared
on one replica's batches; `tandem serve`'s own default on one machine is one per core (bench/serve_replicas.py)."""


def set_http_model(name: str) -> None:
    global HTTP_MODEL
    if name not in SHAPES:
        raise ValueError(f"model must be one of {sorted(SHAPES)}, got {name!r}")
    HTTP_MODEL = name


def set_replicas(n: int) -> None:
    global REPLICAS
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"replicas must be an int >= 1, got {n!r}")
    REPLICAS = n


def set_replica_queue(n: int) -> None:
    global REPLICA_QUEUE
    REPLICA_QUEUE = VARIANTS["adaptive_bounded"]["batching"]["max_queue_len"] = n


def bounded(queued: int) -> dict:
    """App args of a deployment with Serve's proxy-side bound: the proxy answers 503 itself beyond `queued`
    waiting for the replica, which holds at most max_batch_size + REPLICA_QUEUE (README, "Serving")."""
    return {"max_queued_requests": queued, "batching": {"max_queue_len": REPLICA_QUEUE}}


def overload_bounded(
    bench: Bench, cap: float, repeats: int, dur: float, period: float, bounds: tuple[int, ...] = BOUNDS
) -> dict:
    """At a 1.5x sine mean over HTTP, interleaved: static defaults and adaptive on the unbounded deployment, and
    adaptive on deployments bounded at each of `bounds` (redeployed between them). Medians of goodput and the
    other figures; the headline ratio is at the first bound (the app itself is unbounded by default)."""
    from serve_app.simulator import Sine

    plan = [("static_default", "static_default", {}), ("adaptive", "adaptive", {})]
    plan += [(f"adaptive_q{q}", "adaptive_bounded", bench.bounded(q)) for q in bounds]
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for name, v, extra in plan:
            bench.redeploy(extra)
            runs.setdefault(name, []).append(bench.http(v, Sine(1.5 * cap, 0.5, period), dur, tag=name))
    bench.redeploy({})
    keys = ("goodput_rps", "slo_attainment", "timeouts", "rejected_503")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    good = {v: m["goodput_rps"] for v, m in med.items()}
    return {
        "overload_bounded": med,
        "overload_bound": bounds[0],
        "overload_goodput_ratio_bounded": ratio(good[f"adaptive_q{bounds[0]}"], good["static_default"]),
        "overload_goodput_ratio_by_bound": {q: ratio(good[f"adaptive_q{q}"], good["static_default"]) for q in bounds},
        "overload_goodput_ratio_unbounded_interleaved": ratio(good["adaptive"], good["static_default"]),
    }


GENERATOR_LAG_BOUND_MS = 10.0
"""A load is sustained by the generator when its sends' p99 lag behind their schedule stays within this (the
refusal-within-10 ms measurement counts from the scheduled send: a later generator would blur it)."""
GENERATOR_RERUNS = 2
"""Times an HTTP open-loop run is measured again when its generator lagged over GENERATOR_LAG_BOUND_MS."""
OVERLOAD_STATIC_MULTS = (1.5, 1.25, 1.0)
"""Sine means (multiples of static's batched capacity) of the static-capacity overload point, tried in turn until
the generator keeps up; not below 1.0x, where the +-50 % sine still overloads static half of each period."""


GENERATOR_NICENESS = -10
"""The overload generator's niceness where it may raise its priority (root): at 1.5x static's capacity the server
saturates both cores, and a generator at the server's priority (the bench runs Ray's workers at 0) fell 170-260
ms behind its schedule (p99, loaded machine), sending in bursts. Ahead of the server it stands for a client on
another machine; the result records the niceness it got."""


def generator_priority() -> None:
    """Pool initializer: the generator process at GENERATOR_NICENESS when allowed, else as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, GENERATOR_NICENESS)
    except PermissionError:
        pass


def sustained_rounds(
    variants: tuple[str, ...] | list[str],
    repeats: int,
    generate: Callable[[str, float], dict],
    lag_bound_ms: float = GENERATOR_LAG_BOUND_MS,
    mults: tuple[float, ...] = OVERLOAD_STATIC_MULTS,
) -> tuple[float, dict[str, list[dict]], list[dict]]:
    """`repeats` interleaved rounds of `generate(variant, mult)` (a run's row with `send_lag_p99_ms`) at the first
    of `mults` the generator sustains: a round in which any run's generator lagged over `lag_bound_ms` (p99)
    throws the rounds at that rate away and starts again at the next one; at the last the rounds count whatever
    the lag (the caller reports it). Returns the multiple used, the runs by variant and the runs thrown away."""
    rejected: list[dict] = []
    for i, mult in enumerate(mults):
        runs: dict[str, list[dict]] = {}
        for _ in range(repeats):
            batch = [generate(v, mult) for v in variants]
            for v, r in zip(variants, batch, strict=True):
                runs.setdefault(v, []).append(r)
            lag = max(r["send_lag_p99_ms"] or 0.0 for r in batch)
            if lag > lag_bound_ms and i < len(mults) - 1:
                print(f"  generator {lag:.1f} ms late (p99) at {mult:.2f}x: trying {mults[i + 1]:.2f}x", flush=True)
                rejected += [r for rs in runs.values() for r in rs]
                break
        else:
            return mult, runs, rejected
    raise ValueError(f"mults must not be empty, got {mults!r}")


def overload_at_static_capacity(
    bench: Bench,
    static_cap: float,
    repeats: int,
    dur: float,
    period: float,
    variants: tuple[str, ...] = ("static_default", "adaptive"),
    lag_bound_ms: float = GENERATOR_LAG_BOUND_MS,
) -> dict:
    """The overload protocol (a +-50 % sine, variants interleaved, medians over `repeats`) at 1.5x the static
    variant's own batched capacity `static_cap`, not the unbatched one: there static itself is overloaded most
    of each period, so the comparison can tell admission control from batching (at 1.5x the unbatched capacity
    static holds ~84 % of the load and no ratio can pass ~1.2, note 9). The load comes from serve_app/loadgen
    in a process of its own (`generator_priority`); a repeat whose generator sent later than `lag_bound_ms` (p99)
    in any run is not counted and the next rate of OVERLOAD_STATIC_MULTS is tried: the key is a number only at a
    rate the generator provably sustains (`mult_of_static_capacity` says which; else None, with the ratio as
    measured beside it). Per variant: goodput, attainment, 503s, the share of 503s answered within 10 ms of their
    scheduled send, and the generator's lag."""
    from serve_app.loadgen import LoadConfig, run_load_at
    from serve_app.simulator import Sine

    pool = bench.generator()

    def generate(v: str, mult: float) -> dict:
        bench.use(v, HTTP_MODEL)
        load = LoadConfig(pattern=Sine(mult * static_cap, 0.5, period), duration_s=dur, timeout_s=2.0)
        bench.meter.start()
        report = pool.submit(run_load_at, bench.url, load, time.time() + 0.2, SHAPES[HTTP_MODEL]).result()
        return bench._record(v, "http", f"over {mult:.2f}xS", load.pattern, report)

    mult, runs, rejected = sustained_rounds(variants, repeats, generate, lag_bound_ms)
    keys = ("goodput_rps", "slo_attainment", "rejected_503", "rejected_by_ingress", "timeouts",
            "send_lag_p99_ms", "send_lag_max_ms")  # fmt: skip

    def med(rs: list[dict], k: str) -> float | None:
        xs = [r[k] for r in rs if r.get(k) is not None]
        return statistics.median(xs) if xs else None

    per = {v: {k: med(rs, k) for k in keys} for v, rs in runs.items()}
    for v, rs in runs.items():  # pooled over the repeats, as overload_refused_within_10ms_share
        per[v]["refused_within_10ms_share"] = ratio(sum(r["rejected_fast"] for r in rs),
                                                    sum(r["rejected_503"] for r in rs))  # fmt: skip
    lags = [r["send_lag_p99_ms"] or 0.0 for rs in runs.values() for r in rs]
    good = {v: m["goodput_rps"] for v, m in per.items()}
    sustained = max(lags, default=0.0) <= lag_bound_ms
    return {
        # a number only where the generator kept up: else the offered load was not the one scheduled
        "overload_goodput_ratio_at_static_capacity": ratio(good.get("adaptive", 0.0), good.get("static_default", 0.0))
        if sustained
        else None,
        "overload_at_static_capacity": {
            "static_capacity_rps": static_cap,
            "mult_of_static_capacity": mult,
            "mean_rps": mult * static_cap,
            "variants": per,
            "generator_lag_bound_ms": lag_bound_ms,
            "generator_lag_p99_ms_max": max(lags, default=None),
            "generator_sustained": sustained,
            "goodput_ratio_as_measured": ratio(good.get("adaptive", 0.0), good.get("static_default", 0.0)),
            "generator_niceness": bench.generator_niceness,
            "backed_off_runs": len(rejected),
        },
    }


LOSSLESS_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
"""Constant rates (multiples of the unbatched closed-loop capacity) `lossless_rate` climbs until one loses a request.
Where that lies in multiples of the capacity varies from run to run: 0.60x lost 29-109 requests per 8 s run in one
run, 0.80x (the top of the grid then) lost none in another, whose capacity probe read 998/s against 1420/s."""
HOT_UPDATE_MULTS = (0.5, 0.8)
"""The hot-update runs' rates, in multiples of `lossless_rate`'s: 0.8x keeps headroom for the update's own CPU
(~0.45 CPU-s over the controller, the replicas and HAProxy's reload) on cores that serving already fills."""


def lossless_rate(bench: Bench, cap: float, repeats: int) -> tuple[float, dict]:
    """The highest constant rate (requests/s) at which adaptive, with nothing updated, answered every request 200
    in each of `repeats` 8 s runs: `search_held` over LOSSLESS_GRID with one bisection, criterion
    `loses_nothing`. The hot-update runs take their rates from it, not from the closed-loop capacity: that
    capacity rose 1.7x when the replicas moved the app onto their main loop, while what the open-loop generator
    costs per request did not fall, and 0.66x of it became a rate at which runs without any update lost requests
    (122 in 12 runs), so those runs could not tell an update's losses from overload. Returns the rate and the
    search's rows (multiple: lost per run)."""
    from serve_app.simulator import Constant

    def measure(v: str, m: float) -> dict:
        row = bench.http(v, Constant(m * cap), 8.0, tag=f"lossless {m:.2f}x")
        return {**row, "lost": row["sent"] - row["ok"]}

    held, runs = search_held(["adaptive"], list(LOSSLESS_GRID), measure, repeats, refine=1, holds=loses_nothing)
    rate = held["adaptive"] * cap
    print(f"lossless constant rate {rate:.1f}/s ({held['adaptive']:.3f}x the unbatched capacity)", flush=True)
    return rate, {f"{m:.3f}x": [r["lost"] for r in rs] for (_, m), rs in sorted(runs.items(), key=lambda kv: kv[0][1])}


def hot_update_loss(
    bench: Bench,
    cap: float,
    repeats: int,
    bounds: tuple[int, ...],
    mults: tuple[float, ...] = HOT_UPDATE_MULTS,
    generators: tuple[str, ...] = ("process",),
) -> dict:
    """Requests lost (not answered 200) when the artifact is hot-updated 1.5 s into an 8 s constant load, on the
    unbounded deployment and on each bounded one, at each rate: multiples of `lossless_rate`, found first from
    `cap` (the unbatched closed-loop capacity). While Serve
    reconfigures the only replica it routes nothing to it: the requests of that window wait in the proxy, where
    a bound smaller than the window's arrivals answers the excess 503. On bounded deployments both ways: a plain
    re-apply of the config (`serve deploy`) and serve_app.deploy.roll_out (what `hot_update` does: the bound
    lifted for the update). Each update run has a control run without the update (`steady_lost`): a bounded
    replica queue sheds now and then at these rates whether or not anything is updated.

    The load generator runs in a process of its own ("process"): in a thread of this process ("thread", the
    protocol before) it shared the GIL with the update's client work here (Serve's client, the roll-out's polls),
    and a stall of it sent a burst that HAProxy's per-replica cap then rightly refused (`--hot-update-only`
    compares both). Each row records the generator's worst send lag, the 503s HAProxy answered itself, when the
    update ran and when requests failed (s from the load's start)."""
    import concurrent.futures
    import threading

    from serve_app.loadgen import LoadConfig, generator_process, run_load_at
    from serve_app.simulator import Constant

    def in_thread(load: LoadConfig, start_at: float) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def go() -> None:
            try:
                fut.set_result(run_load_at(bench.url, load, start_at, SHAPES[HTTP_MODEL]))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

        threading.Thread(target=go, daemon=True).start()
        return fut

    plan = [("adaptive", "adaptive", {}, False)]
    if bench.proxy_bound:
        for q in bounds:
            plan += [(f"adaptive_q{q}", "adaptive_bounded", bounded(q), False)]
            plan += [(f"adaptive_q{q}_roll_out", "adaptive_bounded", bounded(q), True)]
    else:  # no proxy-side bound to lift through HAProxy: a plain re-apply and roll_out (waits for the swap)
        plan += [("adaptive_roll_out", "adaptive", {}, True)]
    base, base_runs = lossless_rate(bench, cap, repeats)
    if base <= 0:
        floor = LOSSLESS_GRID[0] / 2**DESCEND_STEPS
        raise RuntimeError(f"adaptive lost requests at every constant rate down to {floor:.3f}x the unbatched "
                           f"capacity ({cap:.0f}/s): no rate to measure a hot update's losses at")  # fmt: skip
    runs: dict[tuple[bool, str], list[dict]] = {}
    with generator_process() as pool:
        for _ in range(repeats):
            for name, v, extra, via_roll_out in plan:
                bench.redeploy(extra)
                for m in mults:
                    for gen in generators:
                        for update in (True, False):  # and a control run without the update: steady shedding
                            bench.use(v, HTTP_MODEL)
                            load = LoadConfig(pattern=Constant(m * base), duration_s=8.0, timeout_s=10.0)
                            bench.meter.start()
                            start_at = time.time() + 0.5
                            if gen == "process":
                                fut = pool.submit(run_load_at, bench.url, load, start_at, SHAPES[HTTP_MODEL])
                            else:
                                fut = in_thread(load, start_at)
                            time.sleep(max(0.0, start_at + 1.5 - time.time()))
                            window = None
                            if update:
                                t0 = time.time() - start_at
                                bench.use(v, UPDATE_TO, roll_out=via_roll_out, settle=False)
                                window = [round(t0, 2), round(time.time() - start_at, 2)]
                            report = fut.result()
                            tag = f"{'update' if update else 'steady'} {m:.2f}x" + ("" if gen == "process" else " thr")
                            row = bench._record(name, "http", tag, load.pattern, report)
                            row.update(
                                lost=report.sent - report.ok,
                                generator=gen,
                                update_window_s=window,
                                failed_at_s=[round(t, 2) for t, _, st in report.samples if st != 200][:50],
                            )
                            if update or row["lost"]:
                                print(f"    lost {row['lost']} (ingress 503 {report.rejected_by_ingress}), "
                                      f"generator late <= {report.send_lag_max_ms or 0:.0f} ms, update at {window}, "
                                      f"failed at {row['failed_at_s'][:10]}", flush=True)  # fmt: skip
                            key = f"{name} {m:.2f}x" + ("" if gen == "process" else " (generator thread)")
                            runs.setdefault((update, key), []).append(row)
    bench.redeploy({})
    return {
        "hot_update_lossless_rate_rps": base,
        "hot_update_lossless_search_lost": base_runs,
        "hot_update_mults_of_lossless": list(mults),
        "hot_update_lost": {k: [r["lost"] for r in rs] for (u, k), rs in runs.items() if u},
        "steady_lost": {k: [r["lost"] for r in rs] for (u, k), rs in runs.items() if not u},
        "hot_update_sent": {k: [r["sent"] for r in rs] for (u, k), rs in runs.items() if u},
        "hot_update_refused_by_ingress": {
            k: [r["rejected_by_ingress"] for r in rs] for (u, k), rs in runs.items() if u
        },
        "hot_update_generator_lag_max_ms": {
            k: [round(r["send_lag_max_ms"] or 0.0, 1) for r in rs] for (u, k), rs in runs.items() if u
        },
        "hot_update_generators": list(generators),
    }


def ratio(a: float, b: float) -> float | None:
    """a / b to 9 decimals: held rates are grid multiples of one capacity, and 1.125c / 0.75c is 1.5, not the
    1.4999999999999998 floating point gives (which read as a missed >= 1.5 goal)."""
    return round(a / b, 9) if b > 0 else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat, 4 s runs, coarse grids (~5 minutes)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per point (default 3; 1 with --quick)")
    p.add_argument("--fine", action="store_true", help="with --quick: the full rate grids (0.1x steps)")
    p.add_argument("--bandit", action="store_true", help="also the Bandit controller in the HTTP max-rate section "
                   "(not in the protocol's 30 minutes)")  # fmt: skip
    p.add_argument("--name", default=None, help="results file name (default serving, serving_overload)")
    p.add_argument("--overload-only", action="store_true", help="only the interleaved overload section "
                   "(static defaults, adaptive, adaptive with the proxy-side bound) and the hot-update section "
                   "(~10 minutes with 3 repeats)")  # fmt: skip
    p.add_argument("--hot-update-only", action="store_true", help="only the hot-update section, its load "
                   "generator both in its own process (the protocol) and in a thread of the process that updates "
                   "(the protocol before), interleaved, at 0.8x the lossless constant rate: tells a generator stall "
                   "from a refusal (~6 minutes with 3 repeats)")  # fmt: skip
    p.add_argument("--saturated-only", action="store_true", help="only the generator's ceiling and the "
                   "saturated wrk section with its cost model (~1 minute per repeat), into "
                   "serving_saturated.json")  # fmt: skip
    p.add_argument("--sine-only", action="store_true", help="only the capacities, the HTTP sine search and the "
                   "tight point (~11 minutes with 3 repeats), into serving_sine.json")  # fmt: skip
    p.add_argument("--static-overload-only", action="store_true", help="only the overload point at 1.5x static "
                   "defaults' own batched capacity (overload_goodput_ratio_at_static_capacity; ~2 minutes with 3 "
                   "repeats), into serving_static_overload.json")  # fmt: skip
    p.add_argument("--model", default="tiny", choices=sorted(SHAPES),
                   help="the model of the HTTP sections (default tiny; resnet18: the forward's cost dominates); "
                   "another than tiny writes serving_<model>*.json, never serving.json")  # fmt: skip
    p.add_argument("--replicas", type=int, default=REPLICAS, help="model replicas of every deployment (default 1;"
                   " another count writes <section>_replicas<N>.json, never serving.json)")  # fmt: skip
    p.add_argument("--replica-queue", type=int, default=REPLICA_QUEUE,
                   help="the bounded deployments' replica-side max_queue_len")  # fmt: skip
    p.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"],
                   help="HTTP ingress of the local Ray (default haproxy); haproxy also measures adaptive through the"
                   " Python proxy for haproxy_vs_proxy_saturated_ratio")  # fmt: skip
    p.add_argument(
        "--bounds",
        default=",".join(map(str, BOUNDS)),
        help="proxy-side bounds (max_queued_requests) the overload section compares, comma-separated",
    )
    args = p.parse_args(argv)
    try:
        bounds = tuple(int(b) for b in args.bounds.split(","))
    except ValueError:
        p.error(f"--bounds must be comma-separated ints, got {args.bounds!r}")
    if not bounds or min(bounds) < 1:
        p.error(f"--bounds must be ints >= 1, got {args.bounds!r}")
    if args.replica_queue < 1:
        p.error(f"--replica-queue must be >= 1, got {args.replica_queue}")
    set_replica_queue(args.replica_queue)
    set_http_model(args.model)
    set_replicas(args.replicas)
    repeats = args.repeats or (1 if args.quick else FULL_REPEATS)
    dur = 4.0 if args.quick else FULL_RUN_S
    period = 5.0 if args.quick else FULL_SINE_PERIOD_S
    # Sine means in multiples of the unbatched capacity; steps of 0.1 near the cliff so that a 1.2x difference
    # in the rate held shows. The handle path's grid reaches further: batching holds several times the
    # unbatched capacity there.
    coarse = args.quick and not args.fine
    mults = [0.4, 0.6, 0.8, 1.0, 1.5] if coarse else [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5]
    hmults = [1.0, 2.0, 3.0, 4.0] if coarse else [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0]

    os.environ["RAY_worker_niceness"] = "0"  # before Ray starts: proxy and replicas at normal priority
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray import serve

    t_start = time.monotonic()
    load_before = os.getloadavg()
    from tandem.local_ray import init_embedded, shutdown_embedded

    wrk_s = 3.0 if args.quick else FULL_WRK_S
    init_embedded(8, args.ingress, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = make_artifacts(Path(tmp))
            bench = Bench(artifacts, CpuMeter(), args.ingress)
            setup_s = time.monotonic() - t_start  # Ray, artifacts, the first deploy (planning the fp32 form)
            if args.hot_update_only:
                cap = bench.closed_loop_capacity("nobatch", "http", 3.0 if args.quick else FULL_WRK_S)
                res = {"unbatched_capacity_rps": cap}
                # at the higher rate only: where update runs lost requests (at 0.5x none did, in 12 runs)
                res.update(hot_update_loss(bench, cap, repeats, bounds, HOT_UPDATE_MULTS[-1:],
                                           generators=("process", "thread")))  # fmt: skip
                bench.mark("hot_update")
            elif args.overload_only:
                cap = bench.closed_loop_capacity("nobatch", "http", 3.0 if args.quick else FULL_WRK_S)
                res = {"unbatched_capacity_rps": cap, **overload_bounded(bench, cap, repeats, dur, period, bounds)}
                scap = bench.closed_loop_capacity("static_default", "http", 3.0 if args.quick else FULL_WRK_S)
                res.update(batched_capacity_rps={"static_default": scap})
                res.update(overload_at_static_capacity(bench, scap, repeats, dur, period))
                bench.mark("overload")
                res.update(hot_update_loss(bench, cap, repeats, bounds))
            elif args.sine_only:
                res = run(bench, repeats, dur, period, mults, hmults, args.quick, bounds, args.bandit, sine_only=True)
            elif args.static_overload_only:
                scap = bench.closed_loop_capacity("static_default", "http", 3.0 if args.quick else FULL_WRK_S)
                res = {"batched_capacity_rps": {"static_default": scap}}
                res.update(overload_at_static_capacity(bench, scap, repeats, dur, period))
                bench.mark("overload")
            else:
                res = {"ingress": args.ingress, "generator_ceiling_rps": generator_ceiling(bench.url, wrk_s)}
                sat = saturated(bench, ["nobatch", "static_default", "adaptive"], wrk_s, repeats)
                bench.mark("saturated")
                held = {v: x["rps_within_slo"] for v, x in sat.items()}
                model, ceiling = saturated_cost_model(sat)
                res.update(
                    saturated_rps_within_slo=held,
                    saturated_points=sat,
                    saturated_cost_model=model,
                    saturated_ratio_ceiling_vs_static=ceiling,
                    saturated_ratio_adaptive_vs_static=ratio(held["adaptive"], held["static_default"]),
                    saturated_ratio_adaptive_vs_unbatched=ratio(held["adaptive"], held["nobatch"]),
                )
                if not args.saturated_only:
                    res.update(run(bench, repeats, dur, period, mults, hmults, args.quick, bounds, args.bandit))
                if args.ingress == "haproxy" and not args.saturated_only:  # adaptive through Serve's Python proxy
                    serve.shutdown()
                    shutdown_embedded()
                    init_embedded(8, "proxy", include_dashboard=False, log_to_driver=False)
                    proxy_bench = Bench(artifacts, CpuMeter(), "proxy")
                    bench.mark("setup_proxy")
                    proxy = saturated(proxy_bench, ["adaptive"], wrk_s, repeats)["adaptive"]
                    bench.runs.extend(proxy_bench.runs)
                    res.update(
                        proxy_saturated_rps_within_slo=proxy["rps_within_slo"],
                        proxy_generator_ceiling_rps=generator_ceiling(proxy_bench.url, wrk_s),
                        haproxy_vs_proxy_saturated_ratio=ratio(held["adaptive"], proxy["rps_within_slo"]),
                    )
                    bench.mark("saturated")
            bench.close()
            res.update(generator_reruns=len(bench.lagged), generator_lagged_runs=bench.lagged)
    finally:
        shutdown_embedded()
    wall_s = time.monotonic() - t_start
    res.update(
        full_run_estimate_s=full_run_estimate_s(setup_s, bench.phase_s, repeats, coarse),
        phase_s=bench.phase_s,
        setup_s=setup_s,
        slo_ms=SLO_S * 1e3,
        quick=args.quick,
        fine_grid=not coarse,
        repeats=repeats,
        run_seconds=dur,
        sine_period_s=period,
        wrk_seconds=wrk_s,
        proxy_side_bound_applied=args.ingress == "proxy",
        replicas=REPLICAS,
        wall_s=wall_s,
        loadavg_before=list(load_before),
        loadavg_after=list(os.getloadavg()),
        other_cpu_cores_median=statistics.median(
            [r["other_cpu_cores"] for r in bench.runs]  # the open-loop runs and the wrk points
            + [p["other_cpu_cores"] for x in res.get("saturated_points", {}).values() for p in x["points"]]
        ),
        runs=bench.runs,
    )
    if "overload_bounded" in res:
        print_table(
            [{"variant": v, **m} for v, m in res["overload_bounded"].items()],
            title="HTTP, sine mean 1.5x unbatched capacity, interleaved (medians)",
        )
        print(f"overload goodput ratio, bounded adaptive / static defaults, by bound: "
              f"{res['overload_goodput_ratio_by_bound']}")  # fmt: skip
    if "overload_at_static_capacity" in res:
        o = res["overload_at_static_capacity"]
        print_table(
            [{"variant": v, **m} for v, m in o["variants"].items()],
            title=f"HTTP, sine mean {o['mult_of_static_capacity']:.2f}x static_default's batched capacity "
            f"({o['mean_rps']:.0f}/s), interleaved (medians)",
        )
        print(f"overload goodput ratio at static capacity, adaptive / static defaults: "
              f"{res['overload_goodput_ratio_at_static_capacity']}; generator p99 lag <= "
              f"{o['generator_lag_p99_ms_max']} ms (sustained: {o['generator_sustained']})")  # fmt: skip
    lost = res.get("hot_update_lost", {})
    print_table(
        [
            {
                "deployment, rate": k,
                "lost": v,
                "lost, no update": res["steady_lost"][k],
                "sent": res["hot_update_sent"][k],
                "503 by HAProxy": res["hot_update_refused_by_ingress"][k],
                "generator late, ms": res["hot_update_generator_lag_max_ms"][k],
            }
            for k, v in lost.items()
        ],  # fmt: skip
        title="hot update under constant load: requests lost per repeat"
        + (
            f" (rates: multiples of {res['hot_update_lossless_rate_rps']:.0f}/s, the highest constant rate adaptive "
            "served without losing a request)"
            if lost
            else ""
        ),
    )
    if res.get("saturated_cost_model"):
        m = res["saturated_cost_model"]
        for basis in ("wall", "cpu"):
            f = m[basis]
            if f is None:
                continue
            unit = "ms" if basis == "wall" else "CPU-ms"
            print(f"saturated cost model ({basis}: {unit}/request = O + A / mean batch, least squares over the "
                  f"variants; batch sizes from the {m['mean_batch_source']}): O = {f['per_request_ms']:.3f}, "
                  f"A = {f['per_forward_ms']:.3f}; mean batch {m['mean_batch']}; measured "
                  f"{ {v: round(x, 3) for v, x in f['measured_ms_per_request_all'].items()} }, fitted "
                  f"{ {v: round(x, 3) for v, x in f['fitted_ms_per_request'].items()} }; "
                  f"ceiling vs static_default {f['ratio_ceiling_vs_static']}; measured below the model's floor O "
                  f"(contradicting it): {f['below_floor'] or 'none'}")  # fmt: skip
        print(f"saturated_ratio_ceiling_vs_static ({m['ceiling_basis']}): {res['saturated_ratio_ceiling_vs_static']}")
    rows = []
    for k, (op, goal) in GOALS.items():
        if k not in res:
            continue
        v = res[k]
        met = v is not None and v >= goal
        rows.append({"metric": k, "measured": v if v is not None else "n/a", "goal": f"{op} {goal}",
                     "met": "yes" if met else "NO"})  # fmt: skip
    print_table(rows, title=f"serving ({'quick, ' if args.quick else ''}{repeats} repeat(s), {dur:.0f} s runs)")
    print(f"other processes used {res['other_cpu_cores_median']:.2f} cores (median over runs); load {load_before}")
    est = res["full_run_estimate_s"]
    print(f"this run: {wall_s / 60:.1f} min; the full protocol (no --quick) would take ~{est / 60:.0f} min")
    # A coarse quick run never overwrites the protocol's results (serving.json): it is a check, not a result.
    section = ("serving_hot_update" if args.hot_update_only else "serving_overload" if args.overload_only
               else "serving_static_overload" if args.static_overload_only
               else "serving_sine" if args.sine_only
               else "serving_saturated" if args.saturated_only else "serving")  # fmt: skip
    default = section + ("" if HTTP_MODEL == "tiny" else f"_{HTTP_MODEL}")
    default += ("" if REPLICAS == 1 else f"_replicas{REPLICAS}") + ("_quick" if coarse else "")
    path = write_result(args.name or default, res)
    print(f"wrote {path}")
    return res


FULL_REPEATS, FULL_RUN_S, FULL_SINE_PERIOD_S, FULL_WRK_S = 3, 4.0, 4.0, 5.0
"""The protocol's repeats, open-loop run length (one whole +-50 % sine period per run), and closed-loop (wrk,
capacity) point length (no --quick): short points, so that 3 interleaved repeats of every section fit in 30 minutes
on 2 cores (with 20 s runs: ~2 hours, estimated); the JSON states them (run_seconds, sine_period_s, wrk_seconds)."""


def full_run_estimate_s(setup_s: float, phase_s: dict[str, float], repeats: int, coarse: bool) -> float:
    """The protocol's wall time estimated from this run's sections (`Bench.mark`): start-up once, every section
    times the protocol's repeats over this run's, and the sine sections of a coarse grid times 1.5 (the 0.1x grid
    has two points for each 0.2x step up to a variant's first failure, where it stops climbing: ~1.5x the
    points run, not 9/5). Assumes this run's point lengths (--quick: 3 s closed-loop points for 5 s, so a little
    low there)."""
    total = setup_s
    for phase, s in phase_s.items():
        grid = 1.5 if coarse and phase.startswith("sine") else 1.0
        total += s * (FULL_REPEATS / repeats) * grid if phase != "setup_proxy" else s
    return total


def run(
    bench: Bench,
    repeats: int,
    dur: float,
    period: float,
    mults: list[float],
    hmults: list[float],
    quick: bool,
    bounds: tuple[int, ...] = BOUNDS,
    bandit: bool = False,
    sine_only: bool = False,
) -> dict:
    """The protocol after the saturated points; `sine_only`: up to the tight point (`--sine-only`)."""
    from serve_app.simulator import Constant

    def summary(rs: dict[tuple[str, float], list[dict]], m: float) -> dict[str, dict]:
        keys = ("p50_ms", "p99_ms", "throughput_rps", "goodput_rps", "errors", "timeouts", "rejected_503",
                "slo_attainment")  # fmt: skip
        out = {}
        for (v, mm), xs in rs.items():
            if mm == m:
                out[v] = {k: statistics.median(x[k] if x[k] is not None else float("nan") for x in xs) for k in keys}
        return out

    probe_s = 3.0 if quick else FULL_WRK_S
    cap = bench.closed_loop_capacity("nobatch", "http", probe_s)
    print(f"unbatched HTTP capacity {cap:.1f}/s", flush=True)
    # The ceiling of any max-rate ratio here: saturated throughput with batching over without (the proxy's cost
    # per request does not batch).
    batched_cap = {v: bench.closed_loop_capacity(v, "http", probe_s) for v in ("static_default", "adaptive")}
    print(f"batched HTTP capacity {batched_cap}", flush=True)
    bench.mark("capacity")
    variants = ["nobatch", "static_default", "adaptive"] + (["bandit"] if bandit else [])
    over = min(mults, key=lambda m: abs(m - 1.5))
    held, runs = max_rate_held(bench, variants, cap, mults, repeats, dur, "http", period, always=over)
    bench.mark("sine_http")

    # Tight latency at 1.0x capacity: the static grid against adaptive, interleaved, in two rounds. The best
    # static setting is chosen on the first round's medians and scored, beside adaptive, on a second round of its
    # own: the largest of six noisy medians overstates the setting it picks (one setting spanned 0.85-0.99 in
    # repeats of one run), so choosing and scoring on the same runs biased the difference against adaptive.
    static_grid = [(16, 0.005), (32, 0.0)] if quick else STATIC_GRID
    grid = [f"static_b{b}_w{round(w * 1e3)}" for b, w in static_grid]
    grid += ["static_default", "adaptive", "adaptive_tight"]

    def tight_round(vs: list[str]) -> dict[str, float]:
        got: dict[str, list[float]] = {}
        for _ in range(repeats):
            for v in vs:
                r = bench.http(v, Constant(cap), dur, slo_s=TIGHT_S, tag="tight 1.0x")
                got.setdefault(v, []).append(r["slo_attainment"])
        return {v: statistics.median(xs) for v, xs in got.items()}

    tight_choice = tight_round(grid)
    best_static = max((v for v in tight_choice if v.startswith("static")), key=tight_choice.get)
    tight_med = tight_round([best_static, "adaptive_tight"])
    bench.mark("tight")

    goodput = {v: statistics.median(r["goodput_rps"] for r in runs[(v, over)]) for v in variants}
    # Refused at once: the share of the overload point's 503s answered within 10 ms of being sent.
    refused = {v: sum(r["rejected_503"] for r in runs[(v, over)]) for v in variants}
    fast = {v: sum(r["rejected_fast"] for r in runs[(v, over)]) for v in variants}
    fast_share = {v: fast[v] / refused[v] if refused[v] else None for v in variants}
    sine = {
        "unbatched_capacity_rps": cap,
        "batched_capacity_rps": batched_cap,
        "max_rate_held_rps": held,
        "max_rate_bracket_rps": held_brackets(held, runs, cap),
        "max_rate_ratio_adaptive_vs_static": ratio(held["adaptive"], held["static_default"]),
        "max_rate_ratio_adaptive_vs_nobatch": ratio(held["adaptive"], held["nobatch"]),
        "attainment_tight": tight_med,
        "attainment_tight_choice_round": tight_choice,
        "best_static": best_static,
        "attainment_tight_adaptive_minus_best_static": tight_med["adaptive_tight"] - tight_med[best_static],
        "overload_mult": over,
        "overload_goodput_rps": goodput,
        "overload_goodput_ratio": ratio(goodput["adaptive"], goodput["static_default"]),
        "overload_refused_within_10ms_share": fast_share,
        "variants_http": {f"{m:.2f}x": summary(runs, m) for m in mults},
    }
    if sine_only:
        return sine

    over_bounded = overload_bounded(bench, cap, repeats, dur, period, bounds)
    over_bounded.update(overload_at_static_capacity(bench, batched_cap["static_default"], repeats, dur, period))
    bench.mark("overload")
    over_bounded.update(hot_update_loss(bench, cap, repeats, bounds))
    bench.mark("hot_update")

    hcap = bench.closed_loop_capacity("nobatch", "handle", probe_s)
    print(f"unbatched handle capacity ({HANDLE_MODEL}) {hcap:.1f}/s", flush=True)
    hbatched_cap = {v: bench.closed_loop_capacity(v, "handle", probe_s) for v in ("static_default", "adaptive")}
    print(f"batched handle capacity {hbatched_cap}", flush=True)
    bench.mark("capacity")
    # The handle path's overload point: 3x the unbatched capacity, ~1.5x what static batching holds there (as
    # 1.5x is on HTTP). Higher, the load generator itself (same process, same 2 cores) saturates and every
    # variant collapses whatever the replica does (measured at 5x and 6x).
    hover = min(hmults, key=lambda m: abs(m - 3.0))
    hvariants = ["static_default", "adaptive"]
    hheld, hruns = max_rate_held(bench, hvariants, hcap, hmults, repeats, dur, "handle", period, always=hover)
    hgoodput = {v: statistics.median(r["goodput_rps"] for r in hruns[(v, hover)]) for v in hheld}
    bench.mark("sine_handle")

    ref = min(mults, key=lambda m: abs(m - 0.9))
    print_table(
        [{"variant": v, **{k: x for k, x in s.items()}} for v, s in summary(runs, ref).items()],
        title=f"HTTP, sine mean {ref:.2f}x unbatched capacity ({ref * cap:.0f}/s)",
    )
    print_table(
        [{"variant": v, "held_rps": held[v]} for v in variants]
        + [{"variant": f"{v} (handle)", "held_rps": hheld[v]} for v in hheld],
        title="highest sine mean held at >= 99% within 100 ms",
    )
    return {
        **sine,
        "unbatched_capacity_handle_rps": hcap,
        "batched_capacity_handle_rps": hbatched_cap,
        "max_rate_held_handle_rps": hheld,
        "max_rate_bracket_handle_rps": held_brackets(hheld, hruns, hcap),
        **over_bounded,
        "max_rate_ratio_adaptive_vs_static_handle": ratio(hheld["adaptive"], hheld["static_default"]),
        # Where the replica is the bottleneck (no proxy in front), admission control is what decides overload.
        "overload_goodput_rps_handle": hgoodput,
        "overload_goodput_ratio_handle": ratio(hgoodput["adaptive"], hgoodput["static_default"]),
        "variants_handle": {f"{m:.2f}x": summary(hruns, m) for m in hmults},
        "overload_mult_handle": hover,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
