"""A Ray cluster on this machine whose worker nodes share nothing with the head but the network (issue 14):
the head runs here (host network namespace, node address on a Linux bridge), and each worker node is a
`ray start` inside its own network namespace (a veth pair whose host end is on the bridge: ip_forward is 0 here,
and a bridge needs none) and its own mount namespace, in which /tmp, /dev/shm and the project directory are
private empty tmpfs mounts. Only the installed software (the virtualenv) is bound back in, as a cluster's setup
commands install it on every node; code reaches the nodes as the job's working_dir, data as the storage URI.

Everything is started and stopped by PID (a node's processes are those in its network namespace: `ip netns
pids`), and the namespaces, veths and bridge are removed on exit. Needs root and `ip netns` (the caller skips
otherwise: `unavailable()`). Used by tests/test_multinode.py and bench/cluster_link.py."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_IFNAME = "tdn0"
"""The worker nodes' interface name, the same in every namespace: GLOO_SOCKET_IFNAME for torch.distributed
(inside a namespace the machine's hostname resolves to an address the node does not have, and gloo would fall
back to loopback)."""


def unavailable() -> str | None:
    """Why the namespace cluster cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    probe = f"tdprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def _free_ports(n: int, host: str) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill(pids: list[int], wait_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL for what is left after `wait_s`; only the given PIDs."""
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            for p in pids:  # reap our own children so they do not linger as zombies
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(p, os.WNOHANG)
            time.sleep(0.2)


def pids_with(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (the head's temp dir: only this cluster's processes)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


@dataclass(kw_only=True, slots=True)
class Cluster:
    """What a running namespace cluster offers its user."""

    head_ip: str
    """The head's address on the bridge (where the nodes, and moto_server, reach it)."""
    gcs_address: str
    dashboard: str
    """Job submission address (http://127.0.0.1:port)."""
    env: dict[str, str]
    """Environment for `ray job submit` and other clients (auth token, PATH)."""
    node_ips: list[str]
    node_pids: list[int]
    """PID of each worker node's `ray start --block` (inside its namespaces: /proc/PID/root is its view)."""
    namespaces: list[str]
    host_veths: list[str]
    """The host end of each node's veth (on the bridge), e.g. to shape the link with `tc`."""
    base: Path
    """The head's private temp directory (hidden from the nodes)."""
    shared_dir: Path | None = None
    """The directory bound into every node at the same path, if any."""

    def submit(self, *entrypoint: str, env_vars: dict[str, str] | None = None, timeout: float = 600,
               excludes: tuple[str, ...] = (".venv", "runs", ".git", "**/__pycache__", "bench/results"),
               ) -> subprocess.CompletedProcess:  # fmt: skip
        """`ray job submit --working-dir <project> -- entrypoint...` (blocking, logs in the result)."""
        import json

        runtime_env = {"excludes": list(excludes), "env_vars": dict(env_vars or {})}
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the dashboard agent takes a few seconds after `ray start` to accept jobs
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.base)
            if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
                return out
            time.sleep(3)


def _node_script(hide: list[str], keep: list[str], stash: str, start: list[str]) -> str:
    """The shell run inside a node's new mount namespace: bind the kept paths aside, cover the hidden ones
    with empty tmpfs, move the kept ones back to their places, then exec `ray start`."""
    import shlex

    lines = ["set -e"]
    for j, k in enumerate(keep):
        lines += [f"mkdir -p {stash}/{j}", f"mount --bind {shlex.quote(k)} {stash}/{j}"]
    # parents first, and each path made inside the tmpfs above it: the project may live under /tmp (a CI clone
    # in /tmp/ci), which the /tmp tmpfs would otherwise leave without a mount point
    for h in sorted(hide, key=lambda p: p.rstrip("/").count("/")):
        lines += [f"mkdir -p {shlex.quote(h)}", f"mount -t tmpfs -o size=8g tdnode {shlex.quote(h)}"]
    for j, k in enumerate(keep):
        lines += [f"mkdir -p {shlex.quote(k)}", f"mount --move {stash}/{j} {shlex.quote(k)}"]
    lines.append("exec " + " ".join(shlex.quote(a) for a in start))
    return "\n".join(lines)


@contextlib.contextmanager
def namespace_cluster(
    nodes: int = 2,
    cpus_per_node: int = 3,
    head_cpus: int = 0,
    shared_dir: str | None = None,
    node_env: dict[str, str] | None = None,
    start_timeout_s: float = 180.0,
    ingress: str = "haproxy",
    head_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Head here + `nodes` worker nodes in namespaces. `head_cpus=0` (default) keeps every task, actor, Train
    worker, trial and replica off the head, so whatever they read comes from storage. `shared_dir`: a host
    directory bound into every node at the same path (the NFS case). `node_env`: extra environment of the
    nodes' Ray processes (e.g. AWS_* for the storage). `ingress`: Serve's HTTP ingress, "haproxy" (the head
    runs HAProxy with tandem's launcher, tandem/local_ray.py; every node has the switch, so the replicas open
    their direct-ingress ports) or "proxy" (Serve's Python proxy). `head_env`: extra environment of the head's
    Ray processes (e.g. RAY_SERVE_HAPROXY_LOG_TARGET, where HAProxy sends its access log)."""
    from tandem.local_ray import INGRESSES, haproxy_environment

    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {list(INGRESSES)}, got {ingress!r}")
    tag = secrets.token_hex(2)
    subnet = 100 + int(tag, 16) % 100
    head_ip = f"10.{subnet}.77.1"
    bridge = f"tdbr{tag}"
    base = Path(tempfile.mkdtemp(prefix=f"tdmn{tag}", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
    stash_root = Path(f"/run/tdmn{tag}")
    token = secrets.token_hex(16)
    env = {**os.environ, "HOME": str(base / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    (base / "home").mkdir()
    ingress_env = haproxy_environment(base) if ingress == "haproxy" else {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env.update(ingress_env)
    env.update(head_env or {})
    namespaces: list[str] = []
    node_procs: list[subprocess.Popen] = []
    head_temp = base / "ray"
    made_bridge = False
    try:
        _sh("ip", "link", "add", bridge, "type", "bridge")
        made_bridge = True
        _sh("ip", "addr", "add", f"{head_ip}/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        node_ips = []
        for i in range(nodes):
            ns, host_end, ns_end = f"tdns{tag}{i}", f"tdv{tag}{i}", f"tdp{tag}{i}"
            _sh("ip", "netns", "add", ns)
            namespaces.append(ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _sh("ip", "link", "set", host_end, "master", bridge)
            _sh("ip", "link", "set", host_end, "up")
            _sh("ip", "link", "set", ns_end, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", ns_end, "name", NODE_IFNAME)
            ip = f"10.{subnet}.77.{i + 2}"
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", NODE_IFNAME)
            _sh("ip", "-n", ns, "link", "set", NODE_IFNAME, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            node_ips.append(ip)

        gcs, dash, agent, agent_grpc, nm, om, metrics, rtenv, client = _free_ports(9, "127.0.0.1")
        head = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={head_ip}", f"--port={gcs}",
                f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--node-manager-port={nm}",
                f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={rtenv}", f"--ray-client-server-port={client}",
                f"--num-cpus={head_cpus}", f"--temp-dir={head_temp}", "--disable-usage-stats"]  # fmt: skip
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=start_timeout_s, cwd=base)
        if started.returncode != 0:
            raise RuntimeError("head did not start: " + started.stdout[-2000:] + started.stderr[-2000:])
        gcs_address = f"{head_ip}:{gcs}"

        hide = ["/tmp", "/dev/shm", str(ROOT)]
        keep = [str(BIN.parent)] + ([shared_dir] if shared_dir else [])
        node_environ = {
            "PATH": env["PATH"],
            "HOME": "/tmp/home",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "GLOO_SOCKET_IFNAME": NODE_IFNAME,
            "LANG": "C.UTF-8",
            # the replicas' side of the ingress (HAProxy's own files and ports are the head's alone)
            **{k: v for k, v in ingress_env.items() if not k.startswith("RAY_SERVE_HAPROXY_")},
            **(node_env or {}),
        }
        for i, (ns, ip) in enumerate(zip(namespaces, node_ips, strict=True)):
            start = [str(BIN / "ray"), "start", f"--address={gcs_address}", f"--node-ip-address={ip}",
                     f"--num-cpus={cpus_per_node}", "--temp-dir=/tmp/ray", "--disable-usage-stats",
                     "--block"]  # fmt: skip
            # One node at a time, and a second try: `ray start` gives its raylet a fixed 30 s to register with
            # the GCS, which a loaded 2-core machine missed once (node exited: "timed out during startup").
            for attempt in range(3):
                stash = stash_root / f"{i}-{attempt}"
                stash.mkdir(parents=True)
                script = _node_script(hide, keep, str(stash), start)
                log = open(base / f"node{i}.log", "ab")  # noqa: SIM115 (closed with the process)
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                    env=node_environ,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                )  # fmt: skip
                try:
                    _wait_nodes(gcs_address, env, i + 2, start_timeout_s, [proc], base, i)
                    node_procs.append(proc)
                    break
                except RuntimeError:
                    _kill(netns_pids(ns))
                    proc.wait(timeout=10)
                    if attempt == 2:
                        raise
        yield Cluster(head_ip=head_ip, gcs_address=gcs_address, dashboard=f"http://127.0.0.1:{dash}", env=env,
                      node_ips=node_ips, node_pids=[p.pid for p in node_procs], namespaces=namespaces,
                      host_veths=[f"tdv{tag}{i}" for i in range(nodes)], base=base,
                      shared_dir=Path(shared_dir) if shared_dir else None)  # fmt: skip
    finally:
        for ns in namespaces:  # every process of a node lives in its network namespace
            _kill(netns_pids(ns))
        for p in node_procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        _kill(pids_with(str(head_temp)))
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if made_bridge:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(stash_root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _wait_nodes(gcs: str, env: dict, want: int, timeout_s: float, procs: list, base: Path, first: int = 0) -> None:
    """Until `want` nodes are alive in the cluster (the head counts); RuntimeError when a node process (numbered
    from `first`) exited."""
    code = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); " \
           "print(sum(n['Alive'] for n in ray.nodes()))"  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        for i, p in enumerate(procs, first):
            if p.poll() is not None:
                raise RuntimeError(f"node {i} exited ({p.returncode}): " + (base / f"node{i}.log").read_text()[-3000:])
        out = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(want)]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{want} nodes not up after {timeout_s:.0f} s: {out.stdout[-500:]} {out.stderr[-1500:]}")
        time.sleep(2)
