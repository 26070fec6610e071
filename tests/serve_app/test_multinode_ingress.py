"""`tandem run`'s default cluster (2 simulated nodes on one machine) serves through HAProxy: one HAProxy on the
head, the replicas on the head (where HAProxy reaches them on 127.0.0.1), Train's worker slots on both nodes,
only loopback listening, and no haproxy left after the session (tandem/local_ray.py)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from _serve import GOOD, free_port, haproxy_pids, haproxy_servers, listening_sockets, pid_alive, pids_matching
from test_ingress import tiny_artifact, wait_until

from serve_app.placement import SERVE_NODE_LABEL, http_host, replica_placement
from tandem import local_ray
from tandem.local_ray import ray_session


@pytest.mark.timeout(600)
def test_two_simulated_nodes_serve_through_haproxy(tmp_path, _ray_clusters):
    import ray
    from ray.util.state import list_actors

    _ray_clusters.shutdown()  # the session starts its own cluster, as `tandem run` does
    art = tiny_artifact(tmp_path / "tiny")
    port = free_port()
    with ray_session(nodes=2, cpus_per_node=4, slots_per_node=1) as session:
        assert session["ingress"] == "haproxy" and session["nodes"] == 2 and session["embedded"]
        # tandem started this Ray: loopback; the same cluster joined by address (its head at this machine's
        # address, the worker on 127.0.0.2): all interfaces, whatever nodes are up
        assert http_host(session["embedded"]) == "127.0.0.1"
        assert http_host(False) == "0.0.0.0", ray.get_runtime_context().gcs_address
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and all(n["Resources"].get("worker_slot") == 1 for n in nodes)
        assert replica_placement() == {"label_selector": dict([SERVE_NODE_LABEL])}
        (head,) = [n["NodeID"] for n in nodes if n["Labels"].get(SERVE_NODE_LABEL[0]) == SERVE_NODE_LABEL[1]]
        # Two replicas: Serve spreads replicas over nodes by default, so without the head label one would sit on
        # 127.0.0.2, where HAProxy's connections to 127.0.0.2:<port> find nothing listening.
        url = serve_two_replicas(art, port)
        assert url == f"http://127.0.0.1:{port}"
        run_dir = local_ray._RUN_DIRS[-1]  # this session's HAProxy files
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "ServeReplica" in a.class_name]
        assert len(replicas) == 2 and {a.node_id for a in replicas} == {head}, replicas
        # One HAProxy for the cluster, not one per simulated node. A config change reloads it gracefully (a new
        # process started with -sf <old>), and the old one lingers until its connections finish, so two PIDs can
        # be seen for a moment (CI saw [1623, 1748]); one remains once the reload is over.
        seen: set[int] = set()

        def one_haproxy() -> bool:
            seen.update(haproxy_pids(run_dir))
            return len(haproxy_pids(run_dir)) == 1

        wait_until(one_haproxy, 30, f"haproxy processes under {run_dir} never settled to one: {sorted(seen)}")
        pids = haproxy_pids(run_dir)
        assert len(list(Path(run_dir).glob("h/*/haproxy.tandem.cfg"))) == 1
        servers = haproxy_servers(run_dir, 2)
        assert len(servers) == 2 and all(s.startswith("127.0.0.1:") for s in servers), servers
        assert all(a == "127.0.0.1" for a, _ in listening_sockets(pids))
        replica_socks = listening_sockets(pids_matching("ray::ServeReplica"))
        ports = {int(s.rsplit(":", 1)[1]) for s in servers}
        assert ports <= {p for _, p in replica_socks}
        assert all(a == "127.0.0.1" for a, p in replica_socks if p in ports), replica_socks
        with httpx.Client(base_url=url, timeout=30) as c:
            codes = [c.post("/predict", json=GOOD).status_code for _ in range(40)]
        assert codes == [200] * 40, codes
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in seen):
        assert time.monotonic() < deadline, f"haproxy {sorted(seen)} outlived the session"
        time.sleep(0.2)
    assert not ray.is_initialized()


def serve_two_replicas(art: str, port: int) -> str:
    """`tandem run`'s serve step (tandem.pipeline.serve) with two replicas instead of one."""
    from ray import serve

    from serve_app.deploy import DeployConfig, serve_artifact
    from tandem import pipeline

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    cfg = DeployConfig(port=port, address="auto", app_name=pipeline.APP_NAME, app={"num_replicas": 2})
    return serve_artifact(art, cfg)


def test_http_host_is_loopback_on_tandems_own_ray_and_all_interfaces_on_a_cluster():
    from serve_app.placement import client_host, host_for_cluster

    # the Ray tandem started itself (embedded, simulated nodes): one machine now and later
    assert host_for_cluster(True, "192.0.2.2") == "127.0.0.1"
    # a cluster tandem connected to: all interfaces even while only its head is up (workers may join later)
    assert host_for_cluster(False, "10.0.0.1") == "0.0.0.0"
    # ... unless its head is bound to loopback: no other machine can join it
    assert host_for_cluster(False, "127.0.0.1") == host_for_cluster(False, "[::1]") == "127.0.0.1"
    with pytest.raises(TypeError, match="head_address must be a non-empty string"):
        host_for_cluster(False, "")
    with pytest.raises(TypeError, match="embedded must be a bool"):
        host_for_cluster(None, "10.0.0.1")
    assert client_host("0.0.0.0") == client_host(None) == "127.0.0.1" and client_host("10.0.0.1") == "10.0.0.1"


def test_deploy_config_resolves_its_host_by_who_started_ray(monkeypatch):
    from serve_app import placement
    from serve_app.deploy import DeployConfig

    asked = []
    monkeypatch.setattr(placement, "http_host", lambda embedded: asked.append(embedded) or "0.0.0.0")
    cfg = DeployConfig(port=8123)
    assert cfg.http_options() == {"host": "0.0.0.0", "port": 8123} and cfg.url == "http://127.0.0.1:8123"
    DeployConfig(port=8123, address="auto").http_options()
    assert asked == [True, False]  # no address: this process starts its own Ray; an address: a cluster
    assert DeployConfig(host="10.1.2.3", port=8123).http_options()["host"] == "10.1.2.3"
    with pytest.raises(ValueError, match="host must be a non-empty string or None"):
        DeployConfig(host="")
