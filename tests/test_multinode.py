"""Proof that nothing in `tandem run` needs a shared disk (issue 14, item 7): a cluster on this machine whose two
worker nodes each live in their own network namespace (a veth to a bridge the head is on) and mount namespace
(/tmp, /dev/shm and the project directory private and empty; tests/_netns.py). The head declares no CPUs, so
every Train worker, Ray Data task, Tune trial and Serve replica runs on a worker node and reads what it needs
from the storage URI (an S3-compatible moto_server on the head's bridge address, or a directory bound into every
node: the NFS case), and its code from the job's working_dir. The run goes through `ray job submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _moto import moto_server, patched_env
from _netns import namespace_cluster, unavailable

from models import storage

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _root_and_netns():
    why = unavailable()
    if why:
        pytest.skip(f"namespace cluster unavailable: {why}")


def _run_argv(store: str, name: str, port: int) -> list[str]:
    # 2 workers, one per worker node: the inter-node exchange is the 2-bit codec between the nodes' leaders
    return ["tandem", "run", "--smoke", "--address", "auto", "--storage", store, "--name", name,
            "--workers-per-node", "1", "--codec", "2bit", "--comm-mode", "always", "--epochs", "1",
            "--trials", "1", "--max-acc-drop", "100", "--load-seconds", "2", "--load-rate", "10",
            "--serve-port", str(port)]  # fmt: skip


def _check_report(report: dict, store: str, cluster) -> None:
    hist = report["train"]["history"]
    assert hist and all((h.get("grad_bytes_inter_per_step") or 0) > 0 for h in hist), hist
    assert report["storage"] == storage.join(store, report["name"])
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
def test_run_on_nodes_sharing_only_an_s3_bucket():
    with namespace_cluster(nodes=2, cpus_per_node=3) as cluster:
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
            _check_report(report, store, cluster)


def _node_logs(cluster) -> str:
    return "".join(f"\n== node{i}\n" + (cluster.base / f"node{i}.log").read_text(errors="replace")[-2000:]
                   for i in range(len(cluster.node_pids)))  # fmt: skip


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q"]))
