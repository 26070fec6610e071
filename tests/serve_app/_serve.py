"""Helpers shared by the live Serve tests."""

from __future__ import annotations

import os
import re
import socket
import threading
from dataclasses import dataclass

from tandem.local_ray import free_port as _free_port

GOOD = {"instances": [[0.5] * 64]}
"""A valid /predict body for the 8x8 test models."""


def free_port() -> int:
    """A loopback port nothing listens on now (for Serve's HTTP ingress), outside the ranges Ray binds."""
    return _free_port("127.0.0.1")


_STARTED: dict[str, str] = {}
"""The GCS address and run directory of the HAProxy cluster this session started."""


@dataclass(frozen=True, slots=True)
class Access:
    """One request as HAProxy logged it (its `option httplog` line)."""

    status: int
    total_ms: int
    """Ta: from HAProxy receiving the request's first byte to its sending the response's last byte."""
    receive_ms: int
    """TR: from the request's first byte to the end of its headers (the client's sending; -1 if never)."""
    server: str
    """The server that answered (`<NOSRV>` when HAProxy answered itself)."""
    request: str
    """The request line, e.g. `POST /predict HTTP/1.1`."""
    line: str = ""
    """The whole log line (its termination state, the backend's and server's connection counts, ...)."""

    @property
    def answer_ms(self) -> int:
        """From the request's headers having arrived to the response sent: the server side's own time."""
        return self.total_ms - max(self.receive_ms, 0)


# `frontend backend/server TR/Tw/Tc/Tr/Ta status bytes ... "request line"` (HAProxy's httplog format)
_HTTPLOG = re.compile(r' \S+ \S+/(\S+) (-?\d+)/-?\d+/-?\d+/-?\d+/\+?(\d+) (\d{3}) .* "([^"]*)"')


class HAProxyLog:
    """HAProxy's access log, received here: Ray's HAProxy config logs every request as syslog to
    RAY_SERVE_HAPROXY_LOG_TARGET (default UDP 127.0.0.1:514), and the session's cluster points it at this
    collector's UDP port. Gives server-side timings: how long after a request reached the ingress it was answered."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)  # bursts of thousands of lines
        self.target = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._lines: list[str] = []
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            self._lines.append(self._sock.recv(65536).decode(errors="replace"))

    def mark(self) -> int:
        """A position in the log: `since(mark)` gives what was logged after it."""
        return len(self._lines)

    def since(self, mark: int, path: str = "") -> list[Access]:
        """Requests logged after `mark` whose request line contains `path`."""
        found = []
        for line in self._lines[mark:]:
            m = _HTTPLOG.search(line)
            if m and path in m.group(5):
                found.append(
                    Access(int(m.group(4)), int(m.group(3)), int(m.group(2)), m.group(1), m.group(5), line.strip())
                )
        return found


HAPROXY_LOG: HAProxyLog | None = None
"""The collector of the session's HAProxy cluster (started with it)."""


def haproxy_cluster(clusters):
    """The session's one-node Ray with the HAProxy ingress (started on first use, replacing any other cluster);
    `clusters` is tests/conftest.py's `_ray_clusters`."""
    import ray

    from tandem.local_ray import ingress_environment, short_run_dir

    if (
        ray.is_initialized()
        and clusters.kind == "local"
        and _STARTED.get("gcs") == ray.get_runtime_context().gcs_address
    ):
        return ray
    clusters.shutdown()
    run_dir = short_run_dir()
    global HAPROXY_LOG
    if HAPROXY_LOG is None:
        HAPROXY_LOG = HAProxyLog()
    saved = os.environ.get("RAY_SERVE_HAPROXY_LOG_TARGET")
    os.environ["RAY_SERVE_HAPROXY_LOG_TARGET"] = HAPROXY_LOG.target
    try:
        with ingress_environment("haproxy", run_dir):  # Ray's processes copy the environment when they start
            clusters.ensure("local")
    finally:
        if saved is None:
            os.environ.pop("RAY_SERVE_HAPROXY_LOG_TARGET")
        else:
            os.environ["RAY_SERVE_HAPROXY_LOG_TARGET"] = saved
    _STARTED.update(gcs=ray.get_runtime_context().gcs_address, run_dir=run_dir)
    return ray


def haproxy_run_dir() -> str:
    """Where the session's HAProxy keeps its files (its config, sockets and logs)."""
    return _STARTED["run_dir"]


def haproxy_pids(run_dir: str) -> list[int]:
    """PIDs of the haproxy processes started with a config under `run_dir` (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if argv and argv[0].endswith(b"haproxy") and any(run_dir.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def haproxy_servers(run_dir: str, count: int, timeout: float = 60.0) -> list[str]:
    """The replica addresses (host:port) in HAProxy's config under `run_dir`, once it lists `count` of them.

    HAProxy gets target changes once per 2 s (RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S), so a replica's server line
    may appear a little after the app answers (through the fallback proxy until then). Returns what is listed at
    `timeout` if that never happens, for the caller's assertion to show.
    """
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while True:
        servers = []
        for cfg in Path(run_dir).glob("h/*/haproxy.tandem.cfg"):
            lines = cfg.read_text().splitlines()
            servers += [ln.split()[2] for ln in lines if ln.strip().startswith("server SERVE_REPLICA")]
        if len(servers) >= count or time.monotonic() > deadline:
            return servers
        time.sleep(0.5)


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening_sockets(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds (from /proc)."""
    import ipaddress

    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # exited meanwhile
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:
                    continue
                host, port = local.split(":")
                raw = bytes.fromhex(host)
                # /proc prints the address as host-order 32-bit words
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def pids_matching(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read() and pid_alive(int(entry)):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@dataclass(frozen=True, slots=True)
class Reply:
    """What a test reads of an HTTP answer (picklable, unlike httpx's Response)."""

    status_code: int
    content_type: str
    retry_after: str
    text: str


RAY_WORKER_NICENESS = 15
"""The niceness Ray runs its workers at, Serve replicas included (RAY_worker_niceness)."""


def client_process():
    """A process pool of one spawned process at RAY_WORKER_NICENESS, for a test's load client. A client at nice 0
    in the test's process starves the replica (nice 15) on 2 cores until it has sent everything, and the replica
    then answers what it holds all at once: refusals measured ~0.9 s late in 1 of 3 runs (84 of 556 503s at
    905 ms, all together), a cause of the test machine that a client on another machine does not have."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(
        1, mp_context=ctx, initializer=os.nice, initargs=(RAY_WORKER_NICENESS,)
    )


def start_load(pool, url: str, load, input_shape: tuple[int, ...] = (1, 8, 8)):
    """Starts `load` (serve_app.loadgen.LoadConfig) against `url` in the generator's process (conftest's
    `generator` fixture) 0.3 s from now; the future of its LoadReport."""
    import time

    from serve_app.loadgen import run_load_at

    return pool.submit(run_load_at, url, load, time.time() + 0.3, input_shape)


def niced_bursts(url: str, body: dict, n: int, repeats: int) -> list[Reply]:
    """`repeats` bursts of `n` concurrent POST /predict: run it in `client_process()`."""
    import asyncio

    import httpx

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(c.post("/predict", json=body) for _ in range(n)))

    return [
        Reply(r.status_code, r.headers.get("content-type", ""), r.headers.get("retry-after", ""), r.text)
        for _ in range(repeats)
        for r in asyncio.run(burst())
    ]


def eager_form(model, example, batch_sizes):
    """For models.fuse.fastest_inference_module in tests: the folded eager form, nothing timed or compiled."""
    import models.fuse

    return models.fuse.inference_module(model), {}
