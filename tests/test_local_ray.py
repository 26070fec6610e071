"""tandem.local_ray's direct-ingress port blocks: each embedded cluster's replicas get ports no socket holds."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

from tandem import local_ray


def _block(env: dict[str, str]) -> tuple[int, int, int, int]:
    return tuple(
        int(env[f"RAY_SERVE_DIRECT_INGRESS_{end}_{proto}_PORT"]) for proto in ("HTTP", "GRPC") for end in ("MIN", "MAX")
    )


def test_a_block_in_rays_ranges_and_in_the_haproxy_environment():
    http_lo, http_hi, grpc_lo, grpc_hi = _block(local_ray.direct_ingress_ports())
    assert http_hi - http_lo == grpc_hi - grpc_lo == local_ray._INGRESS_PORT_BLOCK
    assert local_ray._INGRESS_HTTP_PORTS[0] <= http_lo and http_hi <= local_ray._INGRESS_HTTP_PORTS[1] < 32768
    assert local_ray._INGRESS_GRPC_PORTS[0] <= grpc_lo and grpc_hi <= local_ray._INGRESS_GRPC_PORTS[1]
    run_dir = tempfile.mkdtemp(prefix="tdm", dir="/tmp")  # short: HAProxy's socket paths
    try:
        env = local_ray.haproxy_environment(run_dir)
    finally:
        shutil.rmtree(run_dir)
    assert all(port > 0 for port in _block(env))
    # two clusters started one after the other do not get the same block every time
    assert len({_block(local_ray.direct_ingress_ports()) for _ in range(8)}) > 1


def test_a_block_with_a_port_held_anywhere_is_skipped(monkeypatch):
    """Two blocks of 3 ports; a listener on one port of either block (on 127.0.0.2 only, as a simulated node's
    replica binds) leaves the other; both held: a clear error."""
    monkeypatch.setattr(local_ray, "_INGRESS_PORT_BLOCK", 3)
    base = _free_run(12)
    monkeypatch.setattr(local_ray, "_INGRESS_HTTP_PORTS", (base, base + 6))
    monkeypatch.setattr(local_ray, "_INGRESS_GRPC_PORTS", (base + 6, base + 12))
    held = []
    try:
        for port, free_http in ((base + 1, base + 3), (base + 9, base)):  # http of block 0, grpc of block 1
            s = socket.socket()
            s.bind(("127.0.0.2", port))
            s.listen()
            held.append(s)
            if len(held) == 1:
                for _ in range(10):  # random order: every draw must skip block 0
                    assert _block(local_ray.direct_ingress_ports())[0] == free_http
        with pytest.raises(RuntimeError, match="no block of 3 free direct-ingress ports"):
            local_ray.direct_ingress_ports()
    finally:
        for s in held:
            s.close()


def _free_run(n: int) -> int:
    """The first port of `n` consecutive ports that nothing holds now (in tandem's quiet range)."""
    for start in range(local_ray._QUIET_PORTS[0], local_ray._QUIET_PORTS[1] - n, n):
        if all(local_ray._bindable(p) for p in range(start, start + n)):
            return start
    raise AssertionError("no free run of ports")


def test_the_haproxy_cluster_runs_the_app_on_the_replicas_main_loop(monkeypatch):
    """The HAProxy ingress's environment asks Ray to run user code on the replica's main loop (bench/
    serve_user_thread.py measured it faster); a value the user set wins, and the environment is restored after."""
    var = local_ray.USER_CODE_THREAD_VAR
    monkeypatch.delenv(var, raising=False)
    run_dir = tempfile.mkdtemp(prefix="tdm", dir="/tmp")
    try:
        with local_ray.ingress_environment("haproxy", run_dir) as env:
            assert env[var] == "0" and os.environ[var] == "0"
        assert var not in os.environ
        monkeypatch.setenv(var, "1")
        with local_ray.ingress_environment("haproxy", run_dir) as env:
            assert env[var] == "1"
        with local_ray.ingress_environment("proxy") as env:
            assert var not in env
    finally:
        shutil.rmtree(run_dir)
