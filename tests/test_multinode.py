"""Proof that nothing in `tandem run` needs a shared disk (issue 14, item 7): a cluster on this machine whose two
worker nodes each live in their own network namespace (a veth to a bridge the head is on) and mount namespace
(/tmp, /dev/shm and the project directory private and empty; tests/_netns.py). The head declares no CPUs, so
every Train worker, Ray Data task, Tune trial and Serve replica runs on a worker node and reads what it needs
from the storage URI (an S3-compatible moto_server on the head's bridge address, or a directory bound into every
node: the NFS case), and its code from the job's working_dir. The run goes through `ray job submit`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from _moto import moto_server, patched_env
from _netns import namespace_cluster, unavailable

from models import storage
from tandem.local_ray import free_port

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def haproxy_log():
    """A UDP socket on loopback that the head's HAProxy sends its access log to (syslog, `option httplog`:
    one line per request, naming the backend server that answered it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, haproxy_log):
    """One namespace cluster for the module; `shared` is the directory bound into every node (the NFS case)."""
    why = unavailable()
    if why:
        pytest.skip(f"namespace cluster unavailable: {why}")
    shared = tmp_path_factory.mktemp("nfs")
    log_target = f"127.0.0.1:{haproxy_log.getsockname()[1]}"
    with namespace_cluster(nodes=2, cpus_per_node=3, shared_dir=str(shared),
                           head_env={"RAY_SERVE_HAPROXY_LOG_TARGET": log_target}) as c:  # fmt: skip
        yield c


def _drain(sock: socket.socket) -> list[str]:
    """The datagrams waiting on `sock`, as text."""
    lines = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            lines.append(sock.recv(65536).decode(errors="replace"))
    return lines


def _run_argv(store: str, name: str, port: int, *more: str) -> list[str]:
    # 2 workers, one per worker node: the inter-node exchange is the 2-bit codec between the nodes' leaders
    return ["tandem", "run", "--smoke", "--address", "auto", "--storage", store, "--name", name,
            "--workers-per-node", "1", "--codec", "2bit", "--comm-mode", "always", "--epochs", "1",
            "--trials", "1", "--max-acc-drop", "100", "--load-seconds", "2", "--load-rate", "10",
            "--serve-port", str(port), *more]  # fmt: skip


def _check_report(report: dict, store: str, cluster, swept: bool = True, served: bool = True) -> None:
    hist = report["train"]["history"]
    assert hist and all((h.get("grad_bytes_inter_per_step") or 0) > 0 for h in hist), hist
    assert report["storage"] == storage.join(store, report["name"])
    if swept:
        assert report["tune"]["finished"] >= 1 and report["tune"]["artifact"].startswith(store)
    if served:
        assert report["serve"]["artifact"].startswith(store)  # the replica (on a worker node) loaded it from there
        lt = report["loadtest"]
        assert lt["ok"] > 0, lt
    for pid in cluster.node_pids:  # what the nodes see: nothing of the head's files
        root = Path(f"/proc/{pid}/root")
        assert sorted(os.listdir(root / str(Path(__file__).resolve().parents[1]).lstrip("/"))) == [".venv"]
        assert not (root / str(cluster.base).lstrip("/")).exists()


@pytest.mark.timeout(600)
def test_run_on_nodes_sharing_only_an_s3_bucket(cluster, haproxy_log):
    _drain(haproxy_log)
    with moto_server(host=cluster.head_ip) as aws:
        store = "s3://tandem-ci/run"
        # --weighted: the sample-weight store's snapshots go to the bucket too
        out = cluster.submit(*_run_argv(store, "mn", free_port(), "--weighted"), env_vars=aws, timeout=540)
        text = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in text, text[-4000:] + _node_logs(cluster)
        assert "tandem: Serve app 'tandem' deleted" in text
        # a real cluster's ingress: the replicas listen on all of their node's interfaces (placement.http_host)
        assert "tandem: HTTP ingress on the head at 0.0.0.0:" in text, text[-4000:]
        with patched_env(aws):
            report = json.loads(storage.read_text(f"{store}/mn/report.json"))
            fs = pafs.S3FileSystem(endpoint_override=aws["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1")
            sel = pafs.FileSelector("tandem-ci/run/mn", recursive=True)
            rel = {i.path.removeprefix("tandem-ci/run/mn/") for i in fs.get_file_info(sel) if i.is_file}
        assert not list(cluster.shared_dir.iterdir())  # nothing went to the mounted directory
    # everything another node or a later step reads is in the bucket: the prepared data, Ray Train's checkpoints
    # (written by the workers), the weight store's snapshot, the artifacts, the Tune experiment, the report
    for must in ("report.json", "report.md", "training_curves.png", "weight_store.npz", "train_history.json",
                 "artifacts/trained/manifest.json", "tune/artifact/manifest.json", "tune/pareto.md"):  # fmt: skip
        assert must in rel, sorted(rel)
    assert any(f.startswith("data/train/") and f.endswith(".parquet") for f in rel), sorted(rel)
    assert any(f.startswith("train/checkpoint_") and f.endswith("model.pt") for f in rel), sorted(rel)
    assert any(f.startswith("tune/ray/compress/") for f in rel), sorted(rel)
    _check_report(report, store, cluster)
    # the sweep's serving set is what was deployed (CPU trials draw no FP8: tune.sweep.sweep_space, so the one
    # trial is a CPU form); the replica (on a CPU node) loaded its INT8/fp32 form from the bucket
    assert report["tune"]["serving"] is not None, report["tune"]
    assert "tune/serving/serving.json" in rel and report["serve"]["serving_set"] == report["tune"]["serving"]
    forms = report["serve"]["forms"]
    assert "fp8" not in forms and report["serve"]["artifact"] in forms.values(), forms
    # served through HAProxy on the head (no Serve proxy ever started) from a replica on a worker node: the load
    # test's answers (ok > 0 above) came over the bridge from the replica's direct-ingress port
    actors, where = _serve_actors(cluster)
    assert [where[n] for c, n in actors if c == "HAProxyManager"] == [cluster.head_ip], actors
    # Ray's fallback proxy (HAProxy's `backup` server, used only when no replica is up) stays on the head
    assert {where[n] for c, n in actors if c == "ProxyActor"} <= {cluster.head_ip}, actors
    replicas = [where[n] for c, n in actors if c.startswith("ServeReplica:tandem:Model")]
    assert replicas and set(replicas) <= set(cluster.node_ips), (replicas, where)
    # HAProxy's access log: the load test's requests answered 200 by the replica's own server (direct ingress
    # over the bridge). HAProxy applies target changes once per 2 s (RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S), so a
    # request right after the deploy may still meet only the fallback proxy; once the replica is in the backend,
    # none goes to the fallback
    log = [x for x in _drain(haproxy_log) if "/predict" in x or "/v2/models" in x]
    first = next((i for i, x in enumerate(log) if "/SERVE_REPLICA_tandem-Model-" in x and " 200 " in x), None)
    assert first is not None, log[-5:]
    assert not [x for x in log[first:] if "/SERVE_PROXY" in x], log[first:][-5:]


@pytest.mark.timeout(600)
def test_run_on_nodes_sharing_a_mounted_directory(cluster):
    """The NFS case: the storage is a directory every node mounts at the same path (no object store). The sweep
    and Serve are left out (the S3 variant covers both, Serve through HAProxy from a worker node): what differs
    between the two kinds of storage is what the workers read and write there (data, checkpoints) and the
    report, which training alone covers (with nothing after training the run exports no artifact)."""
    store = str(cluster.shared_dir / "runs")
    out = cluster.submit(*_run_argv(store, "nfs", free_port(), "--skip", "tune", "--skip", "serve"), timeout=540)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text[-4000:] + _node_logs(cluster)
    report = json.loads((cluster.shared_dir / "runs" / "nfs" / "report.json").read_text())
    assert any((cluster.shared_dir / "runs" / "nfs" / "train").glob("checkpoint_*"))  # written by the workers
    assert any((cluster.shared_dir / "runs" / "nfs" / "data" / "train").rglob("*.parquet"))  # read by the workers
    assert "serve" not in report and (cluster.shared_dir / "runs" / "nfs" / "report.md").exists()
    _check_report(report, store, cluster, swept=False, served=False)


def _serve_actors(cluster) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(class name, node id) of every actor the cluster has run, dead ones included; node id -> address."""
    import subprocess
    import sys

    code = (
        "import json, sys; from ray.util.state import list_actors, list_nodes; a = sys.argv[1]; "
        "print(json.dumps({'actors': [[x.class_name, x.node_id] for x in list_actors(address=a, limit=10000)], "
        "'nodes': {n.node_id: n.node_ip for n in list_nodes(address=a)}}))"
    )
    out = subprocess.run([sys.executable, "-c", code, cluster.dashboard], env=cluster.env, capture_output=True,
                         text=True, timeout=120, cwd=cluster.base)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return [tuple(a) for a in got["actors"]], got["nodes"]


def _node_logs(cluster) -> str:
    return "".join(f"\n== node{i}\n" + (cluster.base / f"node{i}.log").read_text(errors="replace")[-2000:]
                   for i in range(len(cluster.node_pids)))  # fmt: skip


def test_cluster_link_benchmark_arguments(tmp_path):
    """bench/cluster_link.py (built on this module's cluster) parses its modes, plans its jobs A B B A per link,
    and writes an epoch's worth of rows (steps x batch) as the training data; it is run by hand, not here."""
    import pyarrow.parquet as pq

    from bench.cluster_link import parse_args, plan, write_data

    quick = parse_args(["--quick"])
    assert (quick.preset, quick.epochs, quick.repeats, quick.links) == ("tiny", 1, 1, ["100mbit", "unshaped"])
    assert plan(quick) == [("100mbit", "flat", 0), ("100mbit", "2bit", 0), ("unshaped", "flat", 0),
                           ("unshaped", "auto", 0)]  # fmt: skip
    full = parse_args([])
    assert (full.preset, full.links, full.epochs) == ("resnet18", ["100mbit", "1gbit", "unshaped"], 2)
    jobs = plan(full)
    assert len(jobs) == 12
    assert [m for link, m, _ in jobs if link == "1gbit"] == ["flat", "2bit", "2bit", "flat"]
    assert [m for link, m, _ in jobs if link == "unshaped"] == ["flat", "auto", "auto", "flat"]
    for bad in (["--links", "10gbit"], ["--batch-size", "30"], ["--steps-per-epoch", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    train, test = write_data(tmp_path, full.steps_per_epoch * full.batch_size)
    table = pq.read_table(train)
    assert table.num_rows == 512 and pq.read_table(test).num_rows == 360
    assert table.schema.metadata == pq.read_table(test).schema.metadata  # the image shape travels with the rows
    assert len(set(table.column("label").to_pylist())) == 10


def test_cluster_link_rows_keep_each_level_and_autos_decision():
    """A job's row: DDP's allreduce bytes for a flat job, the hook's inter-node and world-group bytes (not its
    intra + inter total) and its decision for a hierarchical one (auto's, on the unshaped link)."""
    from bench.cluster_link import epoch_row, parse_args

    args = parse_args([])
    flat = epoch_row({"samples_per_s": 64.0, "steps": 8, "test_accuracy": 0.5, "comm": "allreduce",
                      "grad_bytes_per_step": 67e6}, args)  # fmt: skip
    assert (flat["epoch_s"], flat["flat_bytes"], flat["inter_bytes"], flat["compressing"]) == (8.0, 67e6, 0, None)
    hook = {"samples_per_s": 32.0, "steps": 8, "test_accuracy": 0.5, "grad_bytes_intra_per_step": 45e6,
            "grad_bytes_inter_per_step": 1.4e6, "grad_bytes_flat_per_step": 0,
            "grad_bytes_per_step": 46.4e6}  # fmt: skip
    two_bit = epoch_row({**hook, "compressing": True}, args)
    assert (two_bit["epoch_s"], two_bit["flat_bytes"], two_bit["inter_bytes"]) == (16.0, 0, 1.4e6)
    assert two_bit["total_bytes"] == 46.4e6 and two_bit["compressing"] is True
    auto_flat = {**hook, "grad_bytes_intra_per_step": 0, "grad_bytes_inter_per_step": 0,
                 "grad_bytes_flat_per_step": 67e6, "grad_bytes_per_step": 67e6, "compressing": False}  # fmt: skip
    assert epoch_row(auto_flat, args)["flat_bytes"] == 67e6 and epoch_row(auto_flat, args)["compressing"] is False


def test_cluster_link_flat_baseline_is_ddps_own_allreduce():
    """The benchmark's flat jobs train with DDP's own allreduce (CommConfig kind 'allreduce': no hook), the
    baseline the issue's train_epoch_speedup keys name; `tandem bench` lists the benchmark."""
    from bench.cluster_link import MODES
    from tandem.cli import BENCHMARKS, build_parser, run_config

    def comm(*flags: str):
        return run_config(build_parser().parse_args(["train", "--smoke", *flags])).dist.comm

    assert comm(*MODES["flat"]).kind == "allreduce"
    assert (comm(*MODES["2bit"]).kind, comm(*MODES["2bit"]).mode) == ("hierarchical", "always")
    assert comm().kind == "hierarchical" and "cluster_link" in BENCHMARKS
