"""`tandem run --smoke` end to end: embedded 2-node Ray, training with the 2-bit hook, the compression sweep, Serve,
a load test, and the report; two identical `tandem train` runs in a row, then a resume. The run with its storage
on a real S3-compatible server is tests/test_multinode.py's S3 variant (nodes sharing nothing but the bucket; it
checks every file the bucket must hold), not repeated here on the embedded cluster."""

import json
import os

import pytest

from tandem.cli import main
from tandem.local_ray import free_port


@pytest.mark.timeout(900)
def test_tandem_run_smoke(tmp_path, _ray_clusters, monkeypatch):
    """With the default storage, `~/tandem-runs`, as `make demo` runs it (HOME here a temp dir): it reached the
    Train workers as that literal string, where nothing expands `~`, and the first `make demo` failed."""
    _ray_clusters.shutdown()  # the job starts its own embedded cluster
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store, work = tmp_path / "home" / "tandem-runs", tmp_path / "work"
    # 1 trial, not the smoke default 4, and a 2 s load test, not 5: the sweep's and the load generator's own tests
    # cover the search and the load; here each is one step of the run
    rc = main(["run", "--smoke", "--precision", "fp32", "--trials", "1", "--load-seconds", "2", "--serve-port",
               str(free_port()), "--name", "e2e", "--workdir", str(work)])  # fmt: skip
    assert rc == 0
    run = store / "e2e"
    report = json.loads((run / "report.json").read_text())
    assert (work / "report.json").read_text() == (run / "report.json").read_text()
    assert report["cluster"]["nodes"] == 2 and report["name"] == "e2e"
    hist = report["train"]["history"]
    assert len(hist) == 4 and report["test_accuracy"] >= 0.6, hist
    assert all(h["comm"] == "hierarchical/2bit" and h["nodes"] == 2 for h in hist)
    assert (run / "artifacts" / "trained" / "manifest.json").exists()
    assert report["tune"]["trials"] >= 1
    assert report["serve"]["url"].startswith("http://127.0.0.1:")
    lt = report["loadtest"]
    assert lt["sent"] > 0 and lt["ok"] > 0 and 0.0 <= lt["slo_attainment"] <= 1.0
    for name in ("training_curves", "latency_under_load"):
        assert name in report["plots"] and (work / os.path.basename(report["plots"][name])).exists()
    md = (run / "report.md").read_text()
    assert "## Load test" in md and "## Compression sweep" in md


@pytest.mark.timeout(900)
def test_identical_train_runs_in_a_row_then_resume(tmp_path, _ray_clusters):
    """The same `tandem train` twice on one workdir: the second is a new run beside the first (it used to restore
    the first's Ray Train snapshot and crash with an IndexError). Then `--resume NAME` continues the first from
    its latest checkpoint (Ray Train restores it) and its report holds the earlier epoch too; a new run under a
    taken name is refused before anything starts. (One test: three trainings, not four.)

    The three trainings are jobs on one Ray head started here (`--address`, as on a cluster), not three embedded
    clusters started and stopped in turn: what a repeat trips over (the run's name, Ray Train's snapshot) lives in
    the storage, not in the cluster; the embedded cluster is test_tandem_run_smoke's."""
    from ray.cluster_utils import Cluster

    _ray_clusters.shutdown()
    # 4 CPUs: the smoke defaults' 2 workers + 1 for data, the size of the head in tests/test_job_submission.py
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False,
                                                         "temp_dir": os.environ["RAY_TMPDIR"]})  # fmt: skip
    try:
        _train_runs_in_a_row_then_resume(tmp_path, head.address)
    finally:
        head.shutdown()


def _train_runs_in_a_row_then_resume(tmp_path, address: str) -> None:
    common = ["--smoke", "--address", address, "--precision", "fp32", "--storage", str(tmp_path / "runs"),
              "--workdir", str(tmp_path / "work")]  # fmt: skip
    argv = ["train", *common, "--epochs", "1"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "work" / "report.json").read_text())
    assert main(argv) == 0
    second = json.loads((tmp_path / "work" / "report.json").read_text())
    assert first["name"] != second["name"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([first["name"], second["name"]])
    for r in (first, second):
        assert [h["epoch"] for h in r["train"]["history"]] == [0] and not r["train"]["history"][0]["restored"]
    assert main(["train", *common, "--name", first["name"], "--epochs", "1"]) == 2  # taken
    assert main(["train", *common, "--resume", first["name"], "--epochs", "2"]) == 0
    hist = json.loads((tmp_path / "runs" / first["name"] / "report.json").read_text())["train"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert not hist[0]["restored"] and hist[1]["restored"]  # epoch 1 ran after restoring epoch 0's checkpoint
