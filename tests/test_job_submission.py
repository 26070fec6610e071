"""`ray job submit -- tandem train ...` against a head this test starts (`ray start --head`, token auth on as Ray
2.60 enables it by default), then stops: only the processes of this head, found by its temp dir, by PID."""

from __future__ import annotations

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


def _pids_with(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def _stop(marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def head():
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
        "--num-cpus=8",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {"env": env, "address": f"http://127.0.0.1:{dash}"}
    finally:
        _stop(str(temp_dir))
        shutil.rmtree(base, ignore_errors=True)
    assert not _pids_with(str(temp_dir)), "head processes left behind"


def _submit(head: dict, *entrypoint: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--working-dir",
        str(ROOT),
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + 60
    while True:  # the dashboard agent takes a few seconds after `ray start` to accept jobs
        out = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(3)


@pytest.mark.timeout(600)
def test_job_submit_tandem_train(head, tmp_path):
    out = _submit(
        head,
        "tandem",
        "train",
        "--smoke",
        "--address",
        "auto",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workdir",
        str(tmp_path / "work"),
        timeout=480,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "succeeded" in text and "test accuracy:" in text
    assert (tmp_path / "work" / "report.json").exists()


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
