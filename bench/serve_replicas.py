"""Model replicas per machine: one replica against one per core, through HAProxy, on the serving bench's app.

    python -m bench.serve_replicas              # -> bench/results/serve_replicas.json (~9 minutes on 2 cores)

The question it answers: what `num_replicas` should default to on one machine. A replica is one Python process
whose event loops and forward thread share one GIL, so one replica uses about one core of Python however many the
machine has (bench/serving.py's saturated points: 1.0-1.3 cores of our tree on 2).

Each repeat deploys 1 and then `--replicas` replicas (the order swapped every other repeat) and at each measures,
with the same artifact and the serving bench's variants (bench.serving.VARIANTS):
- closed loop (wrk, bench.serving.saturated: 8/16/32 connections, 5 s): requests/s within the 100 ms SLO and the
  peak, for the adaptive controller and Serve's static defaults, and the cores our tree used there (wrk included:
  the load generator shares the machine, as it does in every bench here);
- open loop: a +-50 % sine (4 s period) at `--sine-mults` times one replica's unbatched closed-loop capacity
  (measured once, first), adaptive and static interleaved: attainment within the SLO and HAProxy's 503s;
- the replicas' resident memory after those runs.

Keys: `saturated_rps_within_slo` and `peak_rps` ({replicas: {variant: median}}), `saturated_ratio_replicas_vs_one`
and `peak_ratio_replicas_vs_one` ({variant: ratio of the medians}), `sine_attainment` ({replicas: {variant:
{mult: median}}}), `replica_rss_mb` ({replicas: median of the sum over the replicas}), `peak_cpu_cores`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import print_table, write_result

VARIANTS = ("static_default", "adaptive")
WRK_S = 5.0
SINE_S = 4.0


def replica_rss_mb() -> float:
    """Resident memory of the model replicas that are alive now, summed (MB): the processes of this process tree
    that Ray titled ServeReplica:<app>:Model (the state API would need the dashboard, which the bench leaves off)."""
    import psutil

    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if "ServeReplica:" in title and ":Model" in title:
                total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat (~3 minutes), into serve_replicas_quick.json")
    p.add_argument("--repeats", type=int, default=None, help="repeats per replica count (default 3; 1 with --quick)")
    p.add_argument(
        "--replicas",
        type=int,
        default=os.cpu_count() or 2,
        help="the replica count compared with one (default: this machine's cores)",
    )
    p.add_argument(
        "--sine-mults",
        default="0.8,1.0",
        help="sine means as multiples of one replica's unbatched capacity, comma-separated",
    )
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1 or args.replicas < 2:
        p.error(f"--repeats must be >= 1 and --replicas >= 2, got {args.repeats}, {args.replicas}")
    try:
        mults = [float(m) for m in args.sine_mults.split(",")]
    except ValueError:
        p.error(f"--sine-mults must be comma-separated numbers, got {args.sine_mults!r}")
    os.environ["RAY_worker_niceness"] = "0"  # as bench.serving: replicas at normal priority
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from bench.serving import HTTP_MODEL, Bench, CpuMeter, make_artifacts, saturated
    from serve_app.simulator import Sine
    from tandem.local_ray import init_embedded, shutdown_embedded

    t0, load_before = time.monotonic(), os.getloadavg()
    counts = (1, args.replicas)
    sat: dict[int, dict[str, list[dict]]] = {n: {v: [] for v in VARIANTS} for n in counts}
    sine: dict[int, dict[str, dict[float, list[dict]]]] = {
        n: {v: {m: [] for m in mults} for v in VARIANTS} for n in counts
    }
    rss: dict[int, list[float]] = {n: [] for n in counts}
    init_embedded(8, "haproxy", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bench = Bench(make_artifacts(Path(tmp)), CpuMeter(), "haproxy")
            cap = bench.closed_loop_capacity("nobatch", "http", WRK_S)
            print(f"one replica's unbatched capacity: {cap:.0f} requests/s", flush=True)
            for rep in range(args.repeats):
                for n in counts if rep % 2 == 0 else counts[::-1]:
                    bench.redeploy({} if n == 1 else {"num_replicas": n})
                    print(f"repeat {rep + 1}/{args.repeats}: {n} replica(s)", flush=True)
                    for v, point in saturated(bench, list(VARIANTS), WRK_S, 1).items():
                        sat[n][v].append(point)
                    for m in mults:
                        for v in VARIANTS:
                            sine[n][v][m].append(bench.http(v, Sine(m * cap, 0.5, SINE_S), SINE_S, tag=f"n{n}"))
                    rss[n].append(replica_rss_mb())
            bench.close()
    finally:
        shutdown_embedded()

    med = statistics.median
    within = {n: {v: med([p["rps_within_slo"] for p in sat[n][v]]) for v in VARIANTS} for n in counts}
    peak = {n: {v: med([p["peak_rps"] for p in sat[n][v]]) for v in VARIANTS} for n in counts}
    cores = {n: {v: med([p["peak_cpu_cores"] for p in sat[n][v]]) for v in VARIANTS} for n in counts}
    attain = {
        n: {v: {m: med([r["slo_attainment"] for r in sine[n][v][m]]) for m in mults} for v in VARIANTS} for n in counts
    }
    many = args.replicas
    res = {
        "replicas": many,
        "unbatched_capacity_one_replica_rps": cap,
        "saturated_rps_within_slo": within,
        "peak_rps": peak,
        "peak_cpu_cores": cores,
        "saturated_ratio_replicas_vs_one": {
            v: round(within[many][v] / within[1][v], 4) if within[1][v] else None for v in VARIANTS
        },
        "peak_ratio_replicas_vs_one": {v: round(peak[many][v] / peak[1][v], 4) for v in VARIANTS},
        "sine_attainment": attain,
        "sine_rejected_503": {
            n: {v: {m: med([r["rejected_503"] for r in sine[n][v][m]]) for m in mults} for v in VARIANTS}
            for n in counts
        },
        "replica_rss_mb": {n: med(rss[n]) for n in counts},
        "repeats": args.repeats,
        "sine_mults_of_unbatched_capacity": mults,
        "wall_s": time.monotonic() - t0,
        "loadavg_before": list(load_before),
        "saturated_points": sat,
        "runs": bench.runs,
    }
    rows = []
    for n in counts:
        for v in VARIANTS:
            rows.append(
                {
                    "replicas": n,
                    "variant": v,
                    "rps within SLO": within[n][v],
                    "peak rps": peak[n][v],
                    "cores": cores[n][v],
                    **{f"sine {m}x attain": attain[n][v][m] for m in mults},
                }
            )
    print_table(rows, title=f"{many} replicas against 1 ({args.repeats} repeats, medians; {HTTP_MODEL} model)")
    print(
        f"ratio {many} vs 1 replica, within SLO: {res['saturated_ratio_replicas_vs_one']}; "
        f"peak: {res['peak_ratio_replicas_vs_one']}; replica memory MB: {res['replica_rss_mb']}"
    )
    print(f"wrote {write_result('serve_replicas_quick' if args.quick else 'serve_replicas', res)}")
    return res


if __name__ == "__main__":
    main()
