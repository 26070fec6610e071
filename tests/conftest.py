"""Makes the suite hermetic: Triton interpreter without CUDA, Ray auth off, Ray's files in a temp dir.

Environment variables are set at import time, before any test module imports kernels/ (Triton reads
TRITON_INTERPRET when a kernel is decorated) or Ray (which reads RAY_* and HOME on init).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

# Short prefix: Ray puts unix sockets under RAY_TMPDIR and socket paths are limited to 107 bytes.
_SANDBOX = tempfile.mkdtemp(prefix="tdm", dir="/tmp")
for _name in ("home", "tmp", "ray"):
    os.makedirs(os.path.join(_SANDBOX, _name), exist_ok=True)
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["HOME"] = os.path.join(_SANDBOX, "home")
os.environ["TMPDIR"] = os.path.join(_SANDBOX, "tmp")
os.environ["RAY_TMPDIR"] = os.path.join(_SANDBOX, "ray")
os.makedirs(os.path.join(_SANDBOX, "ray", "ray"), exist_ok=True)  # Ray writes ray_current_cluster there
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
tempfile.tempdir = None  # re-read TMPDIR

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SANDBOX, ignore_errors=True)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Parametrizes a test over CPU (always) and CUDA (skipped without a GPU)."""
    return torch.device(request.param)


class _RayClusters:
    """At most one Ray cluster per test session, switched on demand: `local` (one node) or `two_nodes` (a head
    and a second raylet on 127.0.0.2, so Ray Train sees node ranks 0 and 1). Logical CPUs are over-declared
    (2 real cores, see shared/ENV.md). Everything is shut down at the end of the session."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.cluster = None

    def ensure(self, kind: str):
        import ray

        if self.kind == kind and ray.is_initialized():
            return ray
        self.shutdown()
        if kind == "local":
            ray.init(
                num_cpus=8,
                include_dashboard=False,
                _temp_dir=os.environ["RAY_TMPDIR"],
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            from ray.cluster_utils import Cluster

            # `worker_slot`: 2 per node, so 4 Train workers asking for one each sit 2 + 2 (SPREAD is best effort)
            head = dict(
                num_cpus=6, resources={"worker_slot": 2}, include_dashboard=False, temp_dir=os.environ["RAY_TMPDIR"]
            )
            self.cluster = Cluster(initialize_head=True, head_node_args=head)
            self.cluster.add_node(num_cpus=6, resources={"worker_slot": 2}, node_ip_address="127.0.0.2")
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, log_to_driver=False, configure_logging=False)
        self.kind = kind
        return ray

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        self.kind = None


_CLUSTERS = _RayClusters()


@pytest.fixture(scope="session")
def _ray_clusters():
    try:
        yield _CLUSTERS
    finally:
        _CLUSTERS.shutdown()


@pytest.fixture
def ray_local(_ray_clusters):
    """A one-node Ray (8 logical CPUs), shared by the tests that ask for it."""
    return _ray_clusters.ensure("local")


@pytest.fixture
def ray_two_nodes(_ray_clusters):
    """A simulated two-node Ray cluster (6 logical CPUs each; the second node on 127.0.0.2)."""
    return _ray_clusters.ensure("two_nodes")
