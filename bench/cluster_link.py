"""The hierarchical 2-bit gain measured through the product (issue 14): `tandem train` submitted as a Ray job to
the namespace cluster of tests/_netns.py (head + 2 worker nodes that share nothing but the network, 2 Train
workers on each), with the inter-node veths shaped by `tc tbf` to 100 Mbit and 1 Gbit, then unshaped.

On each link, interleaved (A B A B ...), the same training job with:
  flat   --comm allreduce    DDP's own bucketed allreduce over all 4 workers (no hook): the baseline the issue names
  2bit   --comm-mode always  exact inside a node, the 2-bit codec (error feedback) between the nodes' leaders
  auto   --comm-mode auto    (unshaped link only) compress only where the probed link is slow
Every job trains the same samples per epoch, so the epoch-time ratio is the ratio of the job's reported training
throughput in its last epoch (samples_per_s; the first epoch of a 2-bit job pays the compiled codec's one-off
compile, 20-60 s per worker on 2 cores, so --quick's single epoch is a check, not a result; median over rounds);
accuracy = the job's test accuracy after the same epochs; inter-node bytes per step from the hook's own counters.

Keys: train_epoch_speedup_100mbit (flat / 2bit epoch time, goal >= 5), train_epoch_speedup_1gbit (goal >= 1.3),
auto_mode_fast_link_ratio (auto / flat on the unshaped link, <= 1.05), inter_node_bytes_ratio (the flat run's
bytes per rank and step, counted as a ring allreduce sends them / the 2-bit run's inter-node bytes per step, as
the hook counts them; >= 15),
acc_delta_pts (2-bit minus flat test accuracy, points, >= -0.5).
Storage: a directory bound into every node (the NFS case of tests/test_multinode.py). Needs root and
`ip netns` (otherwise it says why and exits 0, writing nothing). `--quick`: 1 epoch, 1 repeat, `tandem train
--smoke` sizes (the `tiny` preset, smoke data, the plain codec: no 20-60 s compile per worker), 4 jobs: 100 Mbit
flat and 2-bit, unshaped flat and auto. A `tiny` job with the compiled codec took 158 s and the cluster 51 s to
start at load 15; without the compile and on smoke data the 4 jobs are meant to fit 10 minutes (not timed yet:
the coordinator runs it). A full run is 21 jobs of resnet18 (roughly an hour; `--repeats 1` for a third of it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tests/_netns.py: the cluster helper lives with its test

LINKS = {"100mbit": ("100mbit", "128kbit"), "1gbit": ("1gbit", "1mbit"), "unshaped": None}  # rate, burst (ENV.md)
MODES = {"flat": ["--comm", "allreduce"], "2bit": ["--comm-mode", "always"], "auto": ["--comm-mode", "auto"]}
"""Each mode's `tandem train` flags: flat is DDP's own allreduce, the others the hierarchical hook (2-bit codec)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat, smoke sizes: a check, not a result")
    p.add_argument("--preset", default=None, help="model preset (default resnet18; small with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per job (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per link (default 3; 1 quick)")
    p.add_argument("--links", default=None, help="comma-separated among 100mbit,1gbit,unshaped (default all)")
    p.add_argument("--job-timeout", type=float, default=900.0, help="seconds per training job")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/cluster_link.json; "
                   "with --quick nothing is written unless given)")  # fmt: skip
    a = p.parse_args(argv)
    a.preset = a.preset or ("small" if a.quick else "resnet18")
    a.epochs = a.epochs or (1 if a.quick else 2)
    a.repeats = a.repeats or (1 if a.quick else 3)
    links = (a.links or ("100mbit,unshaped" if a.quick else ",".join(LINKS))).split(",")
    bad = [x for x in links if x not in LINKS]
    if bad:
        p.error(f"--links must be among {list(LINKS)}, got {bad}")
    a.links = links
    if a.epochs < 1 or a.repeats < 1:
        p.error(f"--epochs and --repeats must be >= 1, got {a.epochs}, {a.repeats}")
    return a


def shape(cluster, link: str) -> None:
    """tbf on both ends of every node's veth (each direction of the inter-node path); "unshaped" removes it."""
    from _netns import NODE_IFNAME

    spec = LINKS[link]
    for i, ns in enumerate(cluster.namespaces):
        host_end = cluster.host_veths[i]
        for prefix, dev in ((["ip", "netns", "exec", ns], NODE_IFNAME), ([], host_end)):
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if spec is not None:
                rate, burst = spec
                subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                                "latency", "400ms"], check=True, capture_output=True)  # fmt: skip


def train_job(cluster, args, store: str, name: str, mode: str) -> dict:
    argv = ["tandem", "train", "--address", "auto", "--preset", args.preset, "--workers", "4", "--workers-per-node",
            "2", "--codec", "2bit", *MODES[mode], "--epochs", str(args.epochs), "--storage", store, "--name", name,
            *(["--smoke"] if args.quick else [])]  # fmt: skip
    t0 = time.perf_counter()
    out = cluster.submit(*argv, timeout=args.job_timeout)
    if out.returncode != 0:
        raise RuntimeError(f"job {name} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    report = json.loads((Path(store) / name / "report.json").read_text())
    hist = report["train"]["history"]
    return {
        "samples_per_s": hist[-1]["samples_per_s"],  # the first epoch pays the compiled codec's one-off compile
        "test_accuracy": hist[-1]["test_accuracy"],
        "inter_bytes": hist[-1].get("grad_bytes_inter_per_step") or 0,
        "flat_bytes": hist[-1].get("grad_bytes_flat_per_step") or hist[-1].get("grad_bytes_per_step") or 0,
        "job_s": time.perf_counter() - t0,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from _netns import namespace_cluster, unavailable

    why = unavailable()
    if why:
        print(f"cluster_link: skipped ({why})")
        return 0
    t_start = time.perf_counter()
    shared = tempfile.mkdtemp(prefix="tdcl", dir="/tmp")
    rows: dict[str, dict[str, list[dict]]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, ignore_errors=True)
        cluster = stack.enter_context(namespace_cluster(nodes=2, cpus_per_node=3, shared_dir=shared))
        for link in args.links:
            shape(cluster, link)
            # --quick leaves out 2-bit on the unshaped link (no key needs it there): 4 jobs in all
            modes = ["flat", "2bit"] + (["auto"] if link == "unshaped" else [])
            if args.quick and link == "unshaped":
                modes.remove("2bit")
            rows[link] = {m: [] for m in modes}
            for r in range(args.repeats):
                for m in modes:
                    res = train_job(cluster, args, shared, f"{link}-{m}-{r}", m)
                    rows[link][m].append(res)
                    print(f"{link:>9} {m:>5} round {r + 1}: {res['samples_per_s']:.1f} samples/s, "
                          f"acc {res['test_accuracy']:.3f}, job {res['job_s']:.0f} s", flush=True)  # fmt: skip
        shape(cluster, "unshaped")

    def rate(link: str, m: str) -> float:
        return statistics.median(x["samples_per_s"] for x in rows[link][m])

    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    for link in ("100mbit", "1gbit"):
        if link in rows:  # same samples per epoch: epoch-time ratio = throughput ratio
            result[f"train_epoch_speedup_{link}"] = rate(link, "2bit") / rate(link, "flat")
    if "unshaped" in rows:
        result["auto_mode_fast_link_ratio"] = rate("unshaped", "flat") / rate("unshaped", "auto")
    two_bit = [r for r in rows.values() if "2bit" in r]
    inter = statistics.median(x["inter_bytes"] for x in two_bit[0]["2bit"]) if two_bit else 0
    result["inter_node_bytes_ratio"] = (statistics.median(x["flat_bytes"] for x in two_bit[0]["flat"]) / inter
                                        if inter else None)  # fmt: skip
    deltas = [
        statistics.mean(x["test_accuracy"] for x in r["2bit"]) - statistics.mean(x["test_accuracy"] for x in r["flat"])
        for r in two_bit
    ]
    result["acc_delta_pts"] = 100 * statistics.mean(deltas) if deltas else None
    result["seconds"] = time.perf_counter() - t_start
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "config")}, indent=2))
    out = args.out or (None if args.quick else str(REPO / "bench" / "results" / "cluster_link.json"))
    if out:
        from bench._common import write_result

        path = write_result("cluster_link", result, Path(out).parent) if out.endswith("cluster_link.json") else None
        if path is None:
            Path(out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path or out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
