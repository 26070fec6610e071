"""The hierarchical 2-bit gain measured through the product (issue 14): `tandem train` submitted as a Ray job to
the namespace cluster of tests/_netns.py (head + 2 worker nodes that share nothing but the network, 2 Train
workers on each), with the inter-node veths shaped by `tc tbf` to 100 Mbit and 1 Gbit, then unshaped.

On each link, interleaved A B B A (so a linear drift of the machine's load hits both alike), the same training
job with:
  flat   --comm allreduce    DDP's own bucketed allreduce over all 4 workers (no hook): the baseline the issue names
  2bit   --comm-mode always  exact inside a node, the 2-bit codec (error feedback) between the nodes' leaders
  auto   --comm-mode auto    (unshaped link only) compress only where the probed link is slow

An "epoch" here is small by design, so that a full run fits ~20 minutes on 2 cores: `--steps-per-epoch` optimizer
steps (default 8) of `--batch-size` samples (default 64, 16 per worker) over a fixed subset of the bundled digits
(steps x batch training rows, the first rows of the usual stratified shuffled split; the whole 360-row test
split). Every job trains the same epochs (default 2) on the same rows, so the epoch-time ratio is the ratio of
the timed epoch's training throughput (samples_per_s of the job's LAST epoch: the first pays the one-off
warm-ups, the compiled codec's compile among them; median over the rounds); accuracy = the job's test accuracy
after those epochs (tiny training budget: the delta compares like with like, not a converged model);
inter-node bytes per step from the hook's own counters. The JSON says all of this under "epoch".

Keys: train_epoch_speedup_100mbit (flat / 2bit epoch time, goal >= 5), train_epoch_speedup_1gbit (goal >= 1.3),
auto_mode_fast_link_ratio (auto / flat epoch time on the unshaped link, <= 1.05), inter_node_bytes_ratio (the
flat run's bytes per rank and step, counted as a ring allreduce sends them / the 2-bit run's inter-node bytes per
step, as the hook counts them; >= 15), acc_delta_pts (2-bit minus flat test accuracy, points, >= -0.5).

Storage: a directory bound into every node (the NFS case of tests/test_multinode.py). Needs root and
`ip netns` (otherwise it says why and exits 0, writing nothing).
Full run (resnet18, 2 rounds): 12 jobs (100 Mbit and 1 Gbit: flat, 2bit, 2bit, flat; unshaped: flat, auto,
auto, flat); designed for <= 20 min on a quiet 2-core machine: the cluster ~1 min, each job ~50-60 s of fixed cost
(submit, driver, Ray Train start, checkpoints, eval; a train-only smoke job took 46 s in a quiet CI run of
tests/test_multinode.py) plus its 2 epochs, the 100 Mbit flat jobs the longest (~6 s per step: 2 x 8 steps).
`--repeats 1` halves it. `--quick`: a check, not a result: `tandem train --smoke` sizes (the `tiny` preset, the
plain codec: no per-worker compile), 4 steps of 32 per epoch, 1 epoch, 1 round, 4 jobs (100 Mbit flat and
2-bit, unshaped flat and auto); writes nothing unless --out is given. Timed once at load 3-6 (three other
helpers' tests and two of this change's own test runs alongside): 13 min, 94 s for the cluster and 135-187 s
per job; quiet, ~5 min by the CI figure above.
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
WORKERS, PER_NODE = 4, 2
"""2 nodes x 2 Train workers."""
MODES = {"flat": ["--comm", "allreduce"], "2bit": ["--comm-mode", "always"], "auto": ["--comm-mode", "auto"]}
"""Each mode's `tandem train` flags: flat is DDP's own allreduce, the others the hierarchical hook (2-bit codec)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes, 1 epoch, 1 round, 4 jobs: a check, not a result")
    p.add_argument("--preset", default=None, help="model preset (default resnet18; tiny with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per job, the last one timed (default 2; 1 quick)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch (default 8; 4 quick)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step, all 4 workers (64; 32 quick)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per link, A B then B A (default 2; 1 quick)")
    p.add_argument("--links", default=None, help="comma-separated among 100mbit,1gbit,unshaped (default all)")
    p.add_argument("--job-timeout", type=float, default=900.0, help="seconds per training job")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/cluster_link.json; "
                   "with --quick nothing is written unless given)")  # fmt: skip
    a = p.parse_args(argv)
    for name, quick, full in (("preset", "tiny", "resnet18"), ("epochs", 1, 2), ("steps_per_epoch", 4, 8),
                              ("batch_size", 32, 64), ("repeats", 1, 2)):  # fmt: skip
        if getattr(a, name) is None:  # not `or`: an explicit 0 is refused below, not replaced
            setattr(a, name, quick if a.quick else full)
    links = (a.links or ("100mbit,unshaped" if a.quick else ",".join(LINKS))).split(",")
    bad = [x for x in links if x not in LINKS]
    if bad:
        p.error(f"--links must be among {list(LINKS)}, got {bad}")
    a.links = links
    if min(a.epochs, a.repeats, a.steps_per_epoch) < 1:
        p.error(f"--epochs, --repeats and --steps-per-epoch must be >= 1, got {a.epochs}, {a.repeats}, "
                f"{a.steps_per_epoch}")  # fmt: skip
    if a.batch_size < WORKERS or a.batch_size % WORKERS:
        p.error(f"--batch-size must be a positive multiple of the {WORKERS} workers, got {a.batch_size}")
    return a


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(link, mode, round) of every job in run order: per link, round r runs its modes forwards when r is even
    and backwards when odd (A B, B A, ...). Unshaped runs flat and auto only (no key needs 2-bit there)."""
    jobs = []
    for link in args.links:
        modes = ["flat", "auto"] if link == "unshaped" else ["flat", "2bit"]
        for r in range(args.repeats):
            jobs += [(link, m, r) for m in (modes if r % 2 == 0 else modes[::-1])]
    return jobs


def write_data(dest: Path, rows: int) -> tuple[str, str]:
    """(train, test) parquet under `dest`: the first `rows` rows of the bundled digits' (stratified, shuffled)
    training split, and its whole test split. On the head, which every job's driver reads them from."""
    import pyarrow.parquet as pq

    from models.data import write_digits

    train, test = write_digits(dest / "digits")
    table = pq.read_table(train)
    if rows > table.num_rows:
        raise ValueError(f"steps-per-epoch x batch-size must be <= {table.num_rows} rows, got {rows}")
    out = dest / "train.parquet"
    pq.write_table(table.slice(0, rows), out)  # the schema's image-shape metadata goes with the slice
    return str(out), test


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


def train_job(cluster, args, store: str, data: tuple[str, str], name: str, mode: str) -> dict:
    argv = ["tandem", "train", "--address", "auto", "--preset", args.preset, "--workers", str(WORKERS),
            "--workers-per-node", str(PER_NODE), "--codec", "2bit", *MODES[mode], "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--data", data[0], "--test-data", data[1], "--storage", store,
            "--name", name, *(["--smoke"] if args.quick else [])]  # fmt: skip
    t0 = time.perf_counter()
    out = cluster.submit(*argv, timeout=args.job_timeout)
    if out.returncode != 0:
        raise RuntimeError(f"job {name} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    report = json.loads((Path(store) / name / "report.json").read_text())
    last = report["train"]["history"][-1]  # the timed epoch: the first pays the one-off warm-ups
    return {**epoch_row(last, args), "job_s": time.perf_counter() - t0}


def epoch_row(last: dict, args: argparse.Namespace) -> dict:
    """A job's row from its timed epoch's training metrics (`last`: its report's last history entry)."""
    return {
        "samples_per_s": last["samples_per_s"],
        "epoch_s": args.steps_per_epoch * args.batch_size / last["samples_per_s"],
        "steps": last.get("steps"),
        "test_accuracy": last["test_accuracy"],
        "inter_bytes": last.get("grad_bytes_inter_per_step") or 0,
        # the world group's bytes: DDP's allreduce (flat runs; FlatAllreduce names them grad_bytes_per_step), or
        # the hook's flat path (auto that chose not to compress); not the hierarchical run's intra + inter total
        "flat_bytes": last.get("grad_bytes_flat_per_step", last.get("grad_bytes_per_step")) or 0,
        "total_bytes": last.get("grad_bytes_per_step") or 0,
        # the hook's decision in the timed epoch (auto: what its bandwidth probe chose); None for DDP's own
        "compressing": last.get("compressing"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from _netns import namespace_cluster, unavailable

    why = unavailable()
    if why:
        print(f"cluster_link: skipped ({why})")
        return 0
    t_start = time.perf_counter()
    jobs = plan(args)
    rows_per_epoch = args.steps_per_epoch * args.batch_size
    nodes = WORKERS // PER_NODE
    print(
        f"cluster_link: {len(jobs)} jobs of `tandem train` ({args.preset}, {nodes} nodes x {PER_NODE} workers, "
        f"{args.epochs} epoch(s) of {args.steps_per_epoch} steps x {args.batch_size} samples)",
        flush=True,
    )
    shared = tempfile.mkdtemp(prefix="tdcl", dir="/tmp")
    rows: dict[str, dict[str, list[dict]]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, shared, ignore_errors=True)
        data = write_data(Path(shared) / "input", rows_per_epoch)
        cluster = stack.enter_context(namespace_cluster(nodes=2, cpus_per_node=3, shared_dir=shared))
        print(f"cluster_link: cluster up after {time.perf_counter() - t_start:.0f} s", flush=True)
        shaped = None
        for i, (link, m, r) in enumerate(jobs, 1):
            if link != shaped:
                shape(cluster, link)
                shaped = link
            res = train_job(cluster, args, shared, data, f"{link}-{m}-{r}", m)
            rows.setdefault(link, {}).setdefault(m, []).append(res)
            if res["steps"] not in (None, args.steps_per_epoch):
                print(f"cluster_link: warning: the job trained {res['steps']} steps per epoch, not "
                      f"{args.steps_per_epoch}", flush=True)  # fmt: skip
            decided = f", compressing {res['compressing']}" if m == "auto" else ""
            print(f"[{i}/{len(jobs)}] {link:>9} {m:>5} round {r + 1}: epoch {res['epoch_s']:.1f} s "
                  f"({res['samples_per_s']:.1f} samples/s), acc {res['test_accuracy']:.3f}{decided}, job "
                  f"{res['job_s']:.0f} s, total {time.perf_counter() - t_start:.0f} s", flush=True)  # fmt: skip
        shape(cluster, "unshaped")

    def rate(link: str, m: str) -> float:
        return statistics.median(x["samples_per_s"] for x in rows[link][m])

    result: dict = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "epoch": {
            "steps": args.steps_per_epoch,
            "batch_size": args.batch_size,
            "train_rows": rows_per_epoch,
            "test_rows": 360,
            "data": "bundled digits (1x8x8): the first train_rows rows of the stratified shuffled training split",
            "timed": f"the last of {args.epochs} epoch(s) of each job (the first pays one-off warm-ups); epoch "
            "time = train_rows / that epoch's samples_per_s (data stream, steps, BN recompute; not the eval)",
        },
        "rows": rows,
    }
    for link in ("100mbit", "1gbit"):
        if link in rows:  # same samples per epoch: epoch-time ratio = throughput ratio
            result[f"train_epoch_speedup_{link}"] = rate(link, "2bit") / rate(link, "flat")
    if "unshaped" in rows:
        result["auto_mode_fast_link_ratio"] = rate("unshaped", "flat") / rate("unshaped", "auto")
        result["auto_mode_compressing"] = [x["compressing"] for x in rows["unshaped"]["auto"]]  # its decisions
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
