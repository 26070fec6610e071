"""The replica's hot routes answered straight from ASGI messages (`direct_routes`, the default) vs through FastAPI.

    python -m bench.serve_direct_routes          # -> bench/results/serve_direct_routes.json (~6 minutes on 2 cores)

The question it answers: whether serve_app/routes.py's `Ingress`, which answers POST /predict and the OIP infer
routes itself in front of FastAPI, earns its code. For a model as light as the serving bench's `tiny`, the
replica's one event loop is the limit of every HTTP section (note 18), and FastAPI's part of a request was ~30 % of
that loop's time in a profile.

One local Ray (HAProxy ingress, user code on the replica's main loop, as tandem runs it); each repeat deploys the
serving bench's app (1 replica, `tiny`) with `direct_routes` on and off, the order swapped every other repeat (a
redeploy restarts the replica; its fp32 form is recalled, not timed again), and runs the serving bench's
closed-loop points (bench.serving.saturated: wrk at 8/16/32 connections, 5 s) for the unbatched, static-defaults
and adaptive variants.

Keys: `saturated_rps_within_slo` ({setting: {variant: median requests/s with p99 within the 100 ms SLO}}),
`peak_rps`, `peak_cpu_cores`, `p99_ms_at_32`, `ratio_direct_vs_fastapi` ({variant: ratio of the medians within
the SLO}), `ratio_direct_vs_fastapi_peak`, `ratio_adaptive_vs` ({setting: {"nobatch", "static_default"}}),
`loadavg_before`, `loadavg_after`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench._common import print_table, write_result
from bench.serve_user_thread import VARIANTS, WRK_S, setup, summarize, table_rows

SETTINGS = {"direct": True, "fastapi": False}
"""Setting name -> AppConfig.direct_routes."""


def main(argv: list[str] | None = None) -> dict:
    args = setup(argv, __doc__, "deploys per setting")
    from bench.serving import Bench, CpuMeter, make_artifacts, saturated
    from tandem.local_ray import init_embedded, shutdown_embedded

    t0, load_before = time.monotonic(), os.getloadavg()
    sat: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in VARIANTS} for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = make_artifacts(Path(tmp))
        init_embedded(8, "haproxy", include_dashboard=False, log_to_driver=False)
        try:
            bench = Bench(artifacts, CpuMeter(), "haproxy")
            for rep in range(args.repeats):
                for name in list(SETTINGS) if rep % 2 == 0 else list(SETTINGS)[::-1]:
                    print(f"repeat {rep + 1}/{args.repeats}: hot routes {name}", flush=True)
                    bench.redeploy({"direct_routes": SETTINGS[name]})
                    for v, point in saturated(bench, list(VARIANTS), WRK_S, 1).items():
                        sat[name][v].append(point)
            bench.close()
        finally:
            shutdown_embedded()

    within, peak, cores, p99 = summarize(sat)

    def ratio(d: dict) -> dict[str, float | None]:
        return {v: round(d["direct"][v] / d["fastapi"][v], 4) if d["fastapi"][v] else None for v in VARIANTS}

    res = {
        "saturated_rps_within_slo": within,
        "peak_rps": peak,
        "peak_cpu_cores": cores,
        "p99_ms_at_32": p99,
        "ratio_direct_vs_fastapi": ratio(within),
        "ratio_direct_vs_fastapi_peak": ratio(peak),
        "ratio_adaptive_vs": {
            s: {v: round(within[s]["adaptive"] / within[s][v], 4) if within[s][v] else None for v in VARIANTS[:2]}
            for s in SETTINGS
        },
        "repeats": args.repeats,
        "wrk_seconds": WRK_S,
        "wall_s": time.monotonic() - t0,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "saturated_points": sat,
    }
    print_table(table_rows(sat, "hot routes"), title=f"hot routes direct vs through FastAPI ({args.repeats} repeats)")
    print(f"ratio direct vs FastAPI, within SLO: {res['ratio_direct_vs_fastapi']}; peak: "
          f"{res['ratio_direct_vs_fastapi_peak']}; adaptive vs the others: {res['ratio_adaptive_vs']}")  # fmt: skip
    print(f"wrote {write_result('serve_direct_routes', res)}")
    return res


if __name__ == "__main__":
    main()
