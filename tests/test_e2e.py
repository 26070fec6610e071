"""`tandem run --smoke` end to end: embedded 2-node Ray, training with the 2-bit hook and weighted stream, the
compression sweep, Serve, a load test, and the report."""

import json
import socket

import pytest

from tandem.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_tandem_run_smoke(tmp_path, _ray_clusters):
    _ray_clusters.shutdown()  # the job starts its own embedded cluster
    work = tmp_path / "run"
    rc = main(["run", "--smoke", "--precision", "fp32", "--serve-port", str(_free_port()), "--workdir", str(work)])
    assert rc == 0
    report = json.loads((work / "report.json").read_text())
    assert report["cluster"]["nodes"] == 2
    hist = report["train"]["history"]
    assert len(hist) == 4 and report["test_accuracy"] >= 0.6, hist
    assert all(h["comm"] == "hierarchical/2bit" and h["nodes"] == 2 for h in hist)
    assert (work / "artifacts" / "trained" / "manifest.json").exists()
    assert report["tune"]["trials"] >= 1
    assert report["serve"]["url"].startswith("http://127.0.0.1:")
    lt = report["loadtest"]
    assert lt["sent"] > 0 and lt["ok"] > 0 and 0.0 <= lt["slo_attainment"] <= 1.0
    for name in ("training_curves", "weights_histogram", "latency_under_load"):
        assert name in report["plots"]
    md = (work / "report.md").read_text()
    assert "## Load test" in md and "## Compression sweep" in md
