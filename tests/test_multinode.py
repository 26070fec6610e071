"""Proof that nothing in `tandem run` needs a shared disk (issue 14, item 7): a cluster on this machine whose two
worker nodes each live in their own network namespace (a veth to a bridge the head is on) and mount namespace
(/tmp, /dev/shm and the project directory private and empty; tests/_netns.py). The head declares no CPUs, so
every Train worker, Ray Data task, Tune trial and Serve replica runs on a worker node and reads what it needs
from the storage URI (an S3-compatible moto_server on the head's bridge address, or a directory bound into every
node: the NFS case), and its code from the job's working_dir. The run goes through `ray job submit`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _moto import moto_server, patched_env
from _netns import namespace_cluster, unavailable

from models import storage

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One namespace cluster for the module; `shared` is the directory bound into every node (the NFS case)."""
    why = unavailable()
    if why:
        pytest.skip(f"namespace cluster unavailable: {why}")
    shared = tmp_path_factory.mktemp("nfs")
    with namespace_cluster(nodes=2, cpus_per_node=3, shared_dir=str(shared)) as c:
        yield c


def _run_argv(store: str, name: str, port: int, *more: str) -> list[str]:
    # 2 workers, one per worker node: the inter-node exchange is the 2-bit codec between the nodes' leaders
    return ["tandem", "run", "--smoke", "--address", "auto", "--storage", store, "--name", name,
            "--workers-per-node", "1", "--codec", "2bit", "--comm-mode", "always", "--epochs", "1",
            "--trials", "1", "--max-acc-drop", "100", "--load-seconds", "2", "--load-rate", "10",
            "--serve-port", str(port), *more]  # fmt: skip


def _check_report(report: dict, store: str, cluster, swept: bool = True) -> None:
    hist = report["train"]["history"]
    assert hist and all((h.get("grad_bytes_inter_per_step") or 0) > 0 for h in hist), hist
    assert report["storage"] == storage.join(store, report["name"])
    if swept:
        assert report["tune"]["finished"] >= 1 and report["tune"]["artifact"].startswith(store)
    assert report["serve"]["artifact"].startswith(store)  # the replica (on a worker node) loaded it from there
    lt = report["loadtest"]
    assert lt["ok"] > 0, lt
    for pid in cluster.node_pids:  # what the nodes see: nothing of the head's files
        root = Path(f"/proc/{pid}/root")
        assert sorted(os.listdir(root / str(Path(__file__).resolve().parents[1]).lstrip("/"))) == [".venv"]
        assert not (root / str(cluster.base).lstrip("/")).exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_run_on_nodes_sharing_only_an_s3_bucket(cluster):
    with moto_server(host=cluster.head_ip) as aws:
        store = "s3://tandem-ci/run"
        out = cluster.submit(*_run_argv(store, "mn", _free_port()), env_vars=aws, timeout=540)
        text = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in text, text[-4000:] + _node_logs(cluster)
        assert "tandem: Serve app 'tandem' deleted" in text
        with patched_env(aws):
            report = json.loads(storage.read_text(f"{store}/mn/report.json"))
            assert storage.exists(f"{store}/mn/report.md")
            assert storage.exists(f"{store}/mn/artifacts/trained/manifest.json")
        assert not list(cluster.shared_dir.iterdir())  # nothing went to the mounted directory
    _check_report(report, store, cluster)


@pytest.mark.timeout(600)
def test_run_on_nodes_sharing_a_mounted_directory(cluster):
    """The NFS case: the storage is a directory every node mounts at the same path (no object store). The sweep
    is left out (the S3 variant covers it): training, serving from the directory and the report are what
    differ between the two kinds of storage."""
    store = str(cluster.shared_dir / "runs")
    out = cluster.submit(*_run_argv(store, "nfs", _free_port(), "--skip", "tune"), timeout=540)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text[-4000:] + _node_logs(cluster)
    report = json.loads((cluster.shared_dir / "runs" / "nfs" / "report.json").read_text())
    assert (cluster.shared_dir / "runs" / "nfs" / "artifacts" / "trained" / "manifest.json").exists()
    assert any((cluster.shared_dir / "runs" / "nfs" / "train").glob("checkpoint_*"))  # written by the workers
    _check_report(report, store, cluster, swept=False)


def _node_logs(cluster) -> str:
    return "".join(f"\n== node{i}\n" + (cluster.base / f"node{i}.log").read_text(errors="replace")[-2000:]
                   for i in range(len(cluster.node_pids)))  # fmt: skip


def test_cluster_link_benchmark_arguments():
    """bench/cluster_link.py (built on this module's cluster) parses its modes; it is run by hand, not here."""
    from bench.cluster_link import parse_args

    quick = parse_args(["--quick"])
    assert (quick.preset, quick.epochs, quick.repeats, quick.links) == ("small", 1, 1, ["100mbit", "unshaped"])
    full = parse_args([])
    assert (full.preset, full.links) == ("resnet18", ["100mbit", "1gbit", "unshaped"])
    with pytest.raises(SystemExit):
        parse_args(["--links", "10gbit"])
