"""`tandem run --smoke` end to end: embedded 2-node Ray, training with the 2-bit hook, the compression sweep, Serve,
a load test, and the report; the same job with its storage on a real S3-compatible server; two identical
`tandem train` runs in a row."""

import json
import os
import socket

import pyarrow.fs as pafs
import pytest

from tandem.cli import main
from tests._moto import moto_server, patched_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_tandem_run_smoke(tmp_path, _ray_clusters):
    _ray_clusters.shutdown()  # the job starts its own embedded cluster
    store, work = tmp_path / "runs", tmp_path / "work"
    rc = main(["run", "--smoke", "--precision", "fp32", "--serve-port", str(_free_port()), "--storage", str(store),
               "--name", "e2e", "--workdir", str(work)])  # fmt: skip
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
def test_tandem_run_with_storage_on_s3(tmp_path, _ray_clusters):
    """Everything another node or a later step reads lands in the bucket: data, Ray Train checkpoints, the weight
    store's snapshot, the trained artifact, the Tune experiment and the chosen artifact, the report and plots."""
    _ray_clusters.shutdown()
    with moto_server(bucket="tandem-ci") as env, patched_env(env):  # the embedded Ray's workers inherit it
        rc = main(["run", "--smoke", "--precision", "fp32", "--skip", "serve", "--epochs", "2", "--trials", "2",
                   "--weighted", "--max-acc-drop", "100", "--storage", "s3://tandem-ci/run", "--name", "s3",
                   "--workdir", str(tmp_path / "w")])  # fmt: skip
        assert rc == 0
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1")
        files = [i.path for i in fs.get_file_info(pafs.FileSelector("tandem-ci/run/s3", recursive=True)) if i.is_file]
    rel = {f.removeprefix("tandem-ci/run/s3/") for f in files}
    for must in ("report.json", "report.md", "training_curves.png", "weight_store.npz", "train_history.json",
                 "artifacts/trained/manifest.json", "tune/artifact/manifest.json", "tune/pareto.md"):  # fmt: skip
        assert must in rel, sorted(rel)
    assert any(f.startswith("data/train/") and f.endswith(".parquet") for f in rel)
    assert any(f.startswith("train/checkpoint_") and f.endswith("model.pt") for f in rel), sorted(rel)
    assert any(f.startswith("tune/ray/compress/") for f in rel)
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["storage"] == "s3://tandem-ci/run/s3"
    assert report["export"]["artifact"] == "s3://tandem-ci/run/s3/artifacts/trained"
    assert report["tune"]["artifact"] == "s3://tandem-ci/run/s3/tune/artifact"


@pytest.mark.timeout(600)
def test_two_identical_train_runs_in_a_row(tmp_path, _ray_clusters):
    """The same `tandem train` twice on one workdir: the second is a new run beside the first (it used to restore
    the first's Ray Train snapshot and crash with an IndexError)."""
    _ray_clusters.shutdown()
    argv = ["train", "--smoke", "--nodes", "1", "--epochs", "1", "--precision", "fp32", "--storage",
            str(tmp_path / "runs"), "--workdir", str(tmp_path / "work")]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((tmp_path / "work" / "report.json").read_text())
    assert main(argv) == 0
    second = json.loads((tmp_path / "work" / "report.json").read_text())
    assert first["name"] != second["name"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([first["name"], second["name"]])
    for r in (first, second):
        assert [h["epoch"] for h in r["train"]["history"]] == [0] and not r["train"]["history"][0]["restored"]


@pytest.mark.timeout(600)
def test_resume_continues_a_named_run(tmp_path, _ray_clusters):
    """`--resume NAME` continues from the run's latest checkpoint (Ray Train restores it) and the report holds the
    earlier epochs too; a new run under a taken name is refused before anything starts."""
    _ray_clusters.shutdown()
    common = ["--smoke", "--nodes", "1", "--precision", "fp32", "--storage", str(tmp_path / "runs"), "--workdir",
              str(tmp_path / "work")]  # fmt: skip
    assert main(["train", *common, "--name", "r", "--epochs", "1"]) == 0
    assert main(["train", *common, "--name", "r", "--epochs", "1"]) == 2  # taken
    assert main(["train", *common, "--resume", "r", "--epochs", "2"]) == 0
    hist = json.loads((tmp_path / "runs" / "r" / "report.json").read_text())["train"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert not hist[0]["restored"] and hist[1]["restored"]  # epoch 1 ran after restoring epoch 0's checkpoint
