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


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance for the session; logical CPUs over-declared (2 real cores, see shared/ENV.md)."""
    import ray

    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _temp_dir=os.environ["RAY_TMPDIR"],
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
