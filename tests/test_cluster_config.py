"""cluster.yaml and cluster-local.yaml pass Ray's own schema validation; broken copies do not."""

import copy
import json
import re
import shlex
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
        assert all("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" in c for c in start), (key, start)


def _submit_lines(text: str) -> dict[str, list[str]]:
    """The header's `ray job submit` lines as argv (shlex), by the tandem step each submits."""
    lines = [ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#")]
    argvs = [shlex.split(ln) for ln in lines if ln.startswith("ray job submit")]
    return {argv[argv.index("--") + 2]: argv for argv in argvs}


def _submit_problems(argv: list[str]) -> list[str]:
    """What a header's submit line lacks: the working dir shipped without the venv and the local runs (each a
    large upload, and runs/ of an earlier job would ship inside the next), a cluster address, shared storage."""
    problems = []
    job = argv[argv.index("--") + 1 :] if "--" in argv else []
    if "--working-dir" not in argv or "--runtime-env-json" not in argv:
        return ["--working-dir / --runtime-env-json"]
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    problems += [f"excludes {x}" for x in (".venv", "runs") if x not in env.get("excludes", [])]
    # `ray job stop` SIGKILLs 3 s after its SIGTERM by default: too soon for the job to delete its Serve app
    if float(env.get("env_vars", {}).get("RAY_JOB_STOP_WAIT_TIME_S", 3)) < 10:
        problems.append("RAY_JOB_STOP_WAIT_TIME_S >= 10")
    if job[:1] != ["tandem"] or "--address" not in job or job[job.index("--address") + 1] != "auto":
        problems.append("tandem ... --address auto")
    if "--storage" not in job or not job[job.index("--storage") + 1].startswith(("s3://", "gs://", "/")):
        problems.append("--storage on shared storage")
    return problems


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_header_says_how_to_submit_each_step_with_shared_storage(name):
    """Every `ray job submit` line of the header (one per step) excludes .venv and runs from the working dir and
    gives the job time to clean up when stopped."""
    text = (ROOT / name).read_text()
    submits = _submit_lines(text)
    assert sorted(submits) == ["run", "serve", "train", "tune"], sorted(submits)
    assert len(submits) == text.count("ray job submit"), "a submit line is listed twice or not as a comment"
    for step, argv in submits.items():
        assert not _submit_problems(argv), (step, _submit_problems(argv))
    # a copy whose one line lacks an exclude (or the runtime env) is caught
    line = next(ln for ln in text.splitlines() if "-- tandem tune" in ln)
    for broken in (
        line.replace(', "runs"', ""),
        re.sub(r" --runtime-env-json '[^']*'", "", line),
        line.replace('"RAY_JOB_STOP_WAIT_TIME_S": "30"', '"RAY_JOB_STOP_WAIT_TIME_S": "3"'),
    ):
        assert broken != line
        assert _submit_problems(_submit_lines(text.replace(line, broken))["tune"]), broken


def test_aws_storage_bucket_is_created_on_the_head():
    cfg = _load("cluster.yaml")
    header = (ROOT / "cluster.yaml").read_text()
    bucket = "my-tandem-bucket"
    assert any(f"s3 mb s3://{bucket}" in c for c in cfg["head_setup_commands"])
    assert f"--storage s3://{bucket}/runs" in header
