"""cluster.yaml and cluster-local.yaml pass Ray's own schema validation; broken copies do not."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_validate(name):
    cfg = prepare_config(copy.deepcopy(_load(name)))
    validate_config(cfg)
    assert any("pip install -e" in c and "[gpu]" in c for c in cfg["setup_commands"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached by port forwarding, never opened


def test_aws_config_has_gpu_workers():
    cfg = _load("cluster.yaml")
    worker = cfg["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))
    assert 0 < worker["min_workers"] <= worker["max_workers"]


@pytest.mark.parametrize(
    "name, breakage",
    [
        ("cluster.yaml", lambda c: c.__setitem__("max_wrokers", 3)),  # misspelt key
        ("cluster.yaml", lambda c: c.__setitem__("max_workers", "many")),  # wrong type
        ("cluster-local.yaml", lambda c: c.__setitem__("idle_timeout_minutes", "soon")),
        ("cluster-local.yaml", lambda c: c["auth"].__setitem__("ssh_usr", "x")),
    ],
)
def test_broken_copies_fail_validation(name, breakage):
    cfg = copy.deepcopy(_load(name))
    breakage(cfg)
    with pytest.raises(Exception) as info:
        validate_config(prepare_config(cfg))
    assert type(info.value).__name__ in {"ValueError", "ValidationError", "KeyError", "TypeError"}


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_every_node_installs_tandem_and_starts_with_haproxy(name):
    cfg = prepare_config(copy.deepcopy(_load(name)))
    # setup_commands run on every node (head_setup/worker_setup only on one kind)
    assert any("pip install -e" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"].get("~/tandem") == "."  # the checkout every node installs from
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_SERVE_ENABLE_HA_PROXY=1" in c for c in start), (key, start)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_header_says_how_to_submit_each_step_with_shared_storage(name):
    header = "\n".join(ln for ln in (ROOT / name).read_text().splitlines() if ln.startswith("#"))
    for step in ("run", "train", "tune", "serve"):
        assert f"-- tandem {step} --address auto" in header, step
    assert "--storage s3://" in header and '"excludes": [".venv", "runs"]' in header


def test_aws_storage_bucket_is_created_on_the_head():
    cfg = _load("cluster.yaml")
    header = (ROOT / "cluster.yaml").read_text()
    bucket = "my-tandem-bucket"
    assert any(f"s3 mb s3://{bucket}" in c for c in cfg["head_setup_commands"])
    assert f"--storage s3://{bucket}/runs" in header
