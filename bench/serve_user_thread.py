"""Where a replica runs the app's code: on its main event loop or on a loop in a thread of its own (Ray's default).

    python -m bench.serve_user_thread           # -> bench/results/serve_user_thread.json (~7 minutes on 2 cores)

The question it answers: what `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD` tandem's local Ray and cluster.yaml
set (tandem/local_ray.py, `replica_environment`). With Ray's default ("1") a direct-ingress replica reads HTTP on
its main loop (uvicorn, Ray's ASGI wrapper) and runs the FastAPI app on a second loop in another thread, so every
request crosses between the loops twice under one GIL; "0" runs both on the main loop. A profile of the replica
(py-spy, 32 connections, adaptive) put ~50 % of its GIL-holding samples on each loop's thread with "1".

Each repeat starts a fresh local Ray (the variable is read when a replica's process starts) once per setting, the
order swapped every other repeat, deploys the serving bench's app (1 replica, the `tiny` model through HAProxy) and
runs the serving bench's closed-loop points (bench.serving.saturated: wrk at 8/16/32 connections, 5 s) for the
unbatched, static-defaults and adaptive variants.

Keys: `saturated_rps_within_slo` ({setting: {variant: median requests/s with p99 within the 100 ms SLO}}),
`peak_rps`, `peak_cpu_cores`, `p99_ms_at_32` ({setting: {variant: median p99 at 32 connections}}),
`ratio_main_vs_separate` ({variant: ratio of the medians within the SLO}), `ratio_adaptive_vs` ({setting:
{"nobatch", "static_default": adaptive's ratio to each}}), `loadavg_before`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from bench._common import print_table, write_result

VARIANTS = ("nobatch", "static_default", "adaptive")
SETTINGS = {"main": "0", "separate": "1"}
"""Setting name -> RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD."""
WRK_S = 5.0


def main(argv: list[str] | None = None) -> dict:
    args = setup(argv, __doc__, "cluster starts per setting")
    from bench.serving import Bench, CpuMeter, make_artifacts, saturated
    from tandem.local_ray import USER_CODE_THREAD_VAR, init_embedded, shutdown_embedded

    t0, load_before = time.monotonic(), os.getloadavg()
    sat: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in VARIANTS} for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = make_artifacts(Path(tmp))
        for rep in range(args.repeats):
            for name in list(SETTINGS) if rep % 2 == 0 else list(SETTINGS)[::-1]:
                print(f"repeat {rep + 1}/{args.repeats}: user code on the {name} loop", flush=True)
                # Ray's processes copy the environment when Ray starts; replica_environment keeps a set value
                with mock.patch.dict(os.environ, {USER_CODE_THREAD_VAR: SETTINGS[name]}):
                    init_embedded(8, "haproxy", include_dashboard=False, log_to_driver=False)
                try:
                    bench = Bench(artifacts, CpuMeter(), "haproxy")
                    for v, point in saturated(bench, list(VARIANTS), WRK_S, 1).items():
                        sat[name][v].append(point)
                    bench.close()
                finally:
                    shutdown_embedded()

    within, peak, cores, p99 = summarize(sat)
    res = {
        "saturated_rps_within_slo": within,
        "peak_rps": peak,
        "peak_cpu_cores": cores,
        "p99_ms_at_32": p99,
        "ratio_main_vs_separate": {
            v: round(within["main"][v] / within["separate"][v], 4) if within["separate"][v] else None for v in VARIANTS
        },
        "ratio_adaptive_vs": {
            s: {v: round(within[s]["adaptive"] / within[s][v], 4) for v in ("nobatch", "static_default")}
            for s in SETTINGS
        },
        "repeats": args.repeats,
        "wrk_seconds": WRK_S,
        "wall_s": time.monotonic() - t0,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "saturated_points": sat,
    }
    print_table(
        table_rows(sat, "user code"),
        title=f"user code on the main loop vs its own thread ({args.repeats} repeats, medians)",
    )
    print(f"ratio main vs separate, within SLO: {res['ratio_main_vs_separate']}; "
          f"adaptive vs the others: {res['ratio_adaptive_vs']}")  # fmt: skip
    print(f"wrote {write_result('serve_user_thread', res)}")
    return res


def setup(argv: list[str] | None, doc: str | None, repeats: str) -> argparse.Namespace:
    """The A/B benches' arguments (`--repeats`, described as `repeats`), and the environment the serving bench
    runs its replicas in."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help=f"{repeats} (default 3)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    os.environ["RAY_worker_niceness"] = "0"  # as bench.serving: replicas at normal priority
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return args


def summarize(sat: dict[str, dict[str, list[dict]]]) -> tuple[dict, ...]:
    """(within the SLO, peak, cores at the peak, p99 at 32 connections), each {setting: {variant: median over the
    repeats}}, from {setting: {variant: [bench.serving.saturated points]}}."""
    med = statistics.median

    def by(key: str) -> dict[str, dict[str, float]]:
        return {s: {v: med([pt[key] for pt in per[v]]) for v in per} for s, per in sat.items()}

    p99 = {
        s: {v: med([r["p99_ms"] for pt in pts for r in pt["points"] if r["connections"] == 32]) for v, pts in p.items()}
        for s, p in sat.items()
    }
    return by("rps_within_slo"), by("peak_rps"), by("peak_cpu_cores"), p99


def table_rows(sat: dict[str, dict[str, list[dict]]], setting: str) -> list[dict]:
    """The readable table's rows, one per setting and variant; `setting`: the first column's title."""
    within, peak, cores, p99 = summarize(sat)
    return [
        {
            setting: s,
            "variant": v,
            "rps within SLO": within[s][v],
            "peak rps": peak[s][v],
            "p99 ms at 32": p99[s][v],
            "cores": cores[s][v],
        }
        for s in sat
        for v in sat[s]
    ]


if __name__ == "__main__":
    main()
