"""`ray job submit -- tandem train ...` against a head this test starts (`ray start --head`, token auth on as Ray
2.60 enables it by default), then stops: only the processes of this head, found by its temp dir, by PID. The head
is on loopback (127.0.0.2: no other machine can join it), so the jobs' Serve apps listen on loopback only
(serve_app.placement.host_for_cluster), not on every interface of the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _netns import pids_with

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head():
    """One head (4 CPUs: the size the smoke defaults must fit) for every job of this module."""
    # a short path: Ray's unix sockets live under the temp dir and are limited to 107 bytes
    base = Path(tempfile.mkdtemp(prefix="tdmj", dir="/tmp"))
    temp_dir = base / "ray"
    env = {**os.environ, "HOME": str(base / "home"), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    (base / "home").mkdir()
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash, agent, agent_grpc, nm, om, metrics, rtenv, client = _free_ports(9)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        # loopback, but not 127.0.0.1: Ray replaces 127.0.0.1 and localhost with the machine's address
        # (ray._private.services.resolve_ip_for_localhost), which would put the jobs' Serve apps on 0.0.0.0
        "--node-ip-address=127.0.0.2",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rtenv}",
        f"--ray-client-server-port={client}",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "base": base}
    finally:
        _stop(str(temp_dir))
        shutil.rmtree(base, ignore_errors=True)
    assert not pids_with(str(temp_dir)), "head processes left behind"


# the job's package: the project without the virtualenv, local runs and git history
RUNTIME_ENV = json.dumps({"excludes": [".venv", "runs", ".git", "**/__pycache__"]})


def _submit(head: dict, *entrypoint: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        RUNTIME_ENV,
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + 60
    while True:  # the dashboard agent takes a few seconds after `ray start` to accept jobs
        out = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(3)


def _listening(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6, from /proc/net)."""
    addrs = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addrs.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1]) if len(host) == 8 else host)
    return addrs


def _serve_logs(head: dict) -> str:
    """The tail of the head's Serve controller and replica logs (why an app did not come up)."""
    logs = sorted((head["base"] / "ray").glob("session_*/logs/serve/*.log"))
    return "".join(f"\n== {p.name}\n" + p.read_text(errors="replace")[-6000:] for p in logs if "replica" in p.name
                   or "controller" in p.name)  # fmt: skip


def _serve_apps(head: dict) -> str:
    out = subprocess.run([str(BIN / "serve"), "status", "--address", head["address"]], env=head["env"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return out.stdout + out.stderr


@pytest.mark.timeout(900)
def test_job_submit_tandem_run_twice(head, tmp_path):
    """The same `tandem run` job twice: both succeed as two runs, and neither leaves its Serve app behind. The
    sweep is left out here (test_job_submit_tandem_tune submits it): what a repeat could trip over is the run's
    name, Ray Train's snapshot and the Serve app, and serving the fp32 artifact spares two INT8 compiles. One Train
    worker, not the smoke default's 2: that the defaults fit this 4-CPU head is test_job_submit_tandem_train's."""
    store = tmp_path / "runs"
    argv = ["tandem", "run", "--smoke", "--address", "auto", "--epochs", "1", "--workers", "1", "--skip", "tune",
            "--load-seconds", "1", "--load-rate", "20", "--serve-port", str(_free_ports(1)[0]), "--storage",
            str(store)]  # fmt: skip
    for i in range(2):
        out = _submit(head, *argv, timeout=600)
        text = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in text, f"job {i + 1}: " + text[-3000:]
        assert "load test at" in text and "tandem: Serve app 'tandem' deleted" in text
        assert "tandem: HTTP ingress on the head at 127.0.0.1:" in text  # the head is on loopback
        assert "tandem:" not in _serve_apps(head).split("applications:", 1)[-1]
    runs = sorted(store.iterdir())
    assert len(runs) == 2 and all((r / "report.json").exists() for r in runs)
    assert all((r / "artifacts" / "trained" / "manifest.json").exists() for r in runs)


@pytest.mark.timeout(600)
def test_job_submit_tandem_train(head, tmp_path):
    out = _submit(
        head,
        "tandem",
        "train",
        "--smoke",
        "--address",
        "auto",
        "--epochs",
        "1",
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "t1",
        "--workdir",
        str(tmp_path / "work"),
        timeout=480,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "succeeded" in text and "test accuracy:" in text
    assert (tmp_path / "work" / "report.json").exists() and (tmp_path / "runs" / "t1" / "train").is_dir()


@pytest.mark.timeout(600)
def test_job_submit_tandem_tune(head, tmp_path):
    out = _submit(head, "tandem", "tune", "--smoke", "--address", "auto", "--trials", "1", "--max-acc-drop", "100",
                  "--storage", str(tmp_path / "runs"), "--name", "sweep", timeout=480)  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text[-3000:]
    run = tmp_path / "runs" / "sweep"
    assert (run / "pareto.md").exists() and (run / "artifact" / "manifest.json").exists()


@pytest.mark.timeout(300)
def test_job_submit_tandem_serve(head, tmp_path):
    import urllib.request

    import torch

    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)).eval()
    # where `tandem run` leaves a run's trained artifact; served by run name from the storage
    artifact = tmp_path / "runs" / "r1" / "artifacts" / "trained"
    save_artifact(model, artifact, input_shape=(1, 8, 8), accuracy={"test_accuracy": 0.0}, probe=torch.rand(8, 1, 8, 8))
    port = _free_ports(1)[0]
    out = _submit(head, "tandem", "serve", "--address", "auto", "--port", str(port), "--storage",
                  str(tmp_path / "runs"), "--run", "r1", timeout=240)  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text[-2000:] + _serve_logs(head)
    assert f"serving {artifact}" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    assert _listening(port) == {"127.0.0.1"}  # a head on loopback: the app is not reachable from other machines


def test_job_submit_without_token_is_refused(head):
    env = {**head["env"], "HOME": str(Path(head["env"]["HOME"]).parent / "elsewhere")}
    out = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", head["address"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
