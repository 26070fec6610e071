"""The HAProxy ingress (tandem's default, tandem/local_ray.py): only loopback listens, HAProxy's files stay in the
run's directory, its own 503 keeps its status, and no haproxy process outlives Serve, `tandem serve`'s Ctrl-C,
or a stale `ray_current_cluster` file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from _serve import (
    GOOD,
    free_port,
    haproxy_cluster,
    haproxy_pids,
    haproxy_run_dir,
    haproxy_servers,
    listening_sockets,
    pid_alive,
    pids_matching,
)

from serve_app.deploy import DeployConfig, serve_artifact
from tandem.local_ray import QUEUE_TIMEOUT_MS, REPLICA_MAXCONN, haproxy_environment, ingress_environment


def tiny_artifact(path: Path) -> str:
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    torch.manual_seed(0)
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)), path, input_shape=(1, 8, 8))
    return str(path)


@pytest.fixture(scope="module")
def app(_ray_clusters, tmp_path_factory):
    from ray import serve

    haproxy_cluster(_ray_clusters)
    art = tiny_artifact(tmp_path_factory.mktemp("ingress") / "tiny")
    cfg = DeployConfig(port=free_port(), app={"version": "i1"})
    url = serve_artifact(art, cfg)
    yield {"url": url, "cfg": cfg}
    serve.shutdown()


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_environment_and_launcher_config(tmp_path):
    env = haproxy_environment(tempfile.mkdtemp(prefix="tdm", dir="/tmp"))
    run = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    for key in ("SOCKET_PATH", "SERVER_STATE_BASE", "SERVER_STATE_FILE", "METRICS_SOCKET_PATH", "BINARY_PATH"):
        assert env[f"RAY_SERVE_HAPROXY_{key}"].startswith(str(run)), key
    # The launcher's rewrite on a config as Ray's template writes it.
    cfg = run / "x" / "haproxy.cfg"
    cfg.parent.mkdir()
    stats, metrics = env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    cfg.write_text(
        f"defaults\n    errorfile 503 /x/500.http\nfrontend prometheus\n    bind :{metrics}\n"
        f"frontend http_frontend\n    bind *:8000\nlisten stats\n  bind *:{stats}\nbackend tandem\n"
        "    server SERVE_REPLICA--tandem-Model-ab12 127.0.0.1:30000 check observe layer4 error-limit 3\n"
        "    server SERVE_PROXY_ACTOR-x 127.0.0.1:8500 check backup\n"
    )
    out = subprocess.run(
        ["bash", "-c", f'sed -n "/^exec/!p" {env["RAY_SERVE_HAPROXY_BINARY_PATH"]} > {run}/l; bash {run}/l -f {cfg}'],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    text = (cfg.parent / "haproxy.tandem.cfg").read_text()
    assert f"bind 127.0.0.1:{metrics}" in text and f"bind 127.0.0.1:{stats}" in text
    assert "bind *:8000" in text  # the HTTP frontend binds what http_options.host says, untouched
    assert f"errorfile 503 {run}/503.http" in text
    # Overload refused at the ingress: a cap per replica and a short wait for a slot (the fallback proxy: no cap)
    assert f"127.0.0.1:30000 check observe layer4 error-limit 3 maxconn {REPLICA_MAXCONN}\n" in text
    assert "127.0.0.1:8500 check backup\n" in text
    assert text.startswith(f"defaults\n    timeout queue {QUEUE_TIMEOUT_MS}ms\n")
    assert "backend tandem\n    http-request deny deny_status 503 if { queue gt 0 }\n    server SERVE_REPLICA" in text
    head = (run / "503.http").read_bytes()
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in head and b'{"error":' in head
    with pytest.raises(ValueError, match="short path"):
        haproxy_environment("/tmp/" + "d" * 60)
    with pytest.raises(ValueError, match="ingress must be one of"):
        with ingress_environment("nginx"):
            pass


def test_only_loopback_listens(ray_local, app):
    """HAProxy's frontends (HTTP, stats, Prometheus) and the replicas' own HTTP ports: 127.0.0.1 only."""
    run_dir = haproxy_run_dir()
    pids = haproxy_pids(run_dir)
    assert pids
    socks = listening_sockets(pids)
    assert {p for _, p in socks} >= {app["cfg"].port} and len(socks) >= 3, socks
    assert all(a == "127.0.0.1" for a, _ in socks), socks
    servers = haproxy_servers(run_dir, 1)
    assert servers and all(s.startswith("127.0.0.1:") for s in servers), servers
    replica_ports = {int(s.rsplit(":", 1)[1]) for s in servers}
    replicas = listening_sockets(pids_matching("ray::ServeReplica"))
    http = [(a, p) for a, p in replicas if p in replica_ports]
    assert {p for _, p in http} == replica_ports and all(a == "127.0.0.1" for a, _ in http), http
    with httpx.Client(base_url=app["url"]) as c:
        assert c.post("/predict", json=GOOD).json()["version"] == "i1"


def test_unknown_routes_answer_in_the_error_format(ray_local, app):
    with httpx.Client(base_url=app["url"]) as c:
        r = c.get("/v2/nothing/here")
        assert r.status_code == 404 and "Not Found" in r.json()["error"]
        r = c.get("/predict")
        assert r.status_code == 405 and "error" in r.json()


def test_no_haproxy_left_after_serve_shutdown(ray_local, app):
    from ray import serve

    pids = haproxy_pids(haproxy_run_dir())
    assert pids and all(pid_alive(p) for p in pids)
    serve.shutdown()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, f"haproxy {pids} still running after serve.shutdown")


@pytest.mark.slow
def test_tandem_serve_ctrl_c_leaves_no_haproxy(tmp_path):
    """`tandem serve` in its own process group, as a terminal runs it, with a stale `ray_current_cluster` (a
    killed head's) in its RAY_TMPDIR: it starts anyway, serves through HAProxy on loopback, and after Ctrl-C
    (SIGINT to the group) exits 0 with no haproxy and none of its Ray processes left, and the port free."""
    art = tiny_artifact(tmp_path / "tiny")
    root = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: Ray's and HAProxy's socket paths are bounded
    for d in ("ray", "home"):
        os.makedirs(f"{root}/{d}")
    os.makedirs(f"{root}/ray/ray")
    Path(f"{root}/ray/ray/ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")  # nothing listens there
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": f"{root}/ray", "TMPDIR": root, "HOME": f"{root}/home"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tandem.cli", "serve", art, "--port", str(port), "--num-cpus", "4"]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pids: list[int] = []
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"

        def started() -> bool:
            assert proc.poll() is None, "".join(lines)
            return any("Ctrl-C to stop" in line for line in lines)

        wait_until(started, 180, "tandem serve did not start")
        pids = haproxy_pids(root)
        assert pids, "no haproxy under the run's directory"
        assert all(a == "127.0.0.1" for a, _ in listening_sockets(pids))
        r = httpx.post(f"{url}/predict", json=GOOD, timeout=30)
        assert r.status_code == 200, r.text
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hangs: its output and its Python stacks
            dump = subprocess.run(
                [str(Path(sys.executable).parent / "py-spy"), "dump", "-p", str(proc.pid)],
                capture_output=True,
                text=True,
            )
            raise AssertionError(
                f"tandem serve still running 120 s after Ctrl-C:\n{''.join(lines)}\n{dump.stdout}"
            ) from None
        reader.join(10)
        assert proc.returncode == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, f"haproxy {pids} outlived tandem serve")
    wait_until(lambda: not pids_matching(root), 30, f"processes of the run still alive: {pids_matching(root)}")
    with socket.socket() as s:  # nothing listens there any more (connections may linger in TIME_WAIT, as after
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # any server's exit: servers bind like this)
        s.bind(("127.0.0.1", port))
        s.listen()
    shutil.rmtree(root, ignore_errors=True)
